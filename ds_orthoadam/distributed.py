"""The few process-group helpers the trainer and the demo share: this process's rank, a free port for a local
rendezvous, a world of one for a plain ``python -m``, and one small all-reduce for what every rank must agree on."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def process_rank() -> int:
    """This process's global rank as the launcher set it (0 outside a launcher), readable before any process group
    exists, e.g. to decide who reports an error."""
    return int(os.environ.get("RANK", "0"))


def free_port() -> int:
    """A TCP port nothing listens on now, for a rendezvous on this machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_defaults() -> None:
    """Let a plain ``python -m ds_orthoadam.train`` run as a world of one (DeepSpeed would look for MPI instead)."""
    if "RANK" not in os.environ:
        defaults = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        for name, value in defaults.items():
            os.environ.setdefault(name, value)


def agree(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over all ranks (one small all-reduce per step: loss and stop flag travel together)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
