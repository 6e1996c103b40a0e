"""The trainer (``ds_orthoadam.train``'s main) that also writes, right after it resumed, what each rank loaded: its
optimizer state (ZeRO 1/2: its fp32 master partition, moments and step per group, padding removed; stage 0: the
whole optimizer state; ZeRO-3, resumed on one rank: the flat groups, every parameter whole) and, below ZeRO-3, the
module's weights, to ``<dump dir>/rank<r>.pt``; then it trains on as usual.

Run by tests/test_train_e2e.py with ``deepspeed --num_gpus N tests/resume_worker.py --dump DIR <trainer arguments>``
to compare a checkpoint resumed on another number of ranks with the state that was saved.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ds_orthoadam import train


def loaded_state(engine) -> dict:
    optimizer = engine.optimizer
    module = {name: tensor.detach().clone() for name, tensor in engine.module.state_dict().items()}
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3 on one rank: every parameter whole, in order
        groups = []
        for flat, params in zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_groups):
            keep, state = sum(param.ds_numel for param in params), optimizer.optimizer.state[flat]
            groups.append({"fp32": flat[:keep].clone(), "exp_avg": state["exp_avg"][:keep].clone(),
                           "exp_avg_sq": state["exp_avg_sq"][:keep].clone(), "step": state["step"]})
        return {"groups": groups}
    if not hasattr(optimizer, "single_partition_of_fp32_groups"):  # stage 0: the optimizer steps the module
        return {"state": optimizer.state_dict()["state"], "module": module}
    groups = []
    for flat, padding in zip(optimizer.single_partition_of_fp32_groups, optimizer.groups_padding):
        keep = flat.numel() - padding
        state = optimizer.optimizer.state[flat]
        groups.append({"fp32": flat[:keep].clone(), "exp_avg": state["exp_avg"][:keep].clone(),
                       "exp_avg_sq": state["exp_avg_sq"][:keep].clone(), "step": state["step"]})
    return {"groups": groups, "module": module}


def main() -> int:
    options = argparse.ArgumentParser()
    options.add_argument("--dump", required=True, type=Path)
    known, argv = options.parse_known_args()  # the rest (with the launcher's --local_rank) is the trainer's
    dump_dir = known.dump
    resume = train.Trainer._resume

    def resume_and_dump(trainer: train.Trainer, tag: str) -> None:
        resume(trainer, tag)
        torch.save(loaded_state(trainer.engine), dump_dir / f"rank{trainer.rank}.pt")

    train.Trainer._resume = resume_and_dump
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
