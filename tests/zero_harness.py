"""Shared by tests/test_zero_orthoadam.py and the 2-rank worker it launches: models, batches, configs, reference.

Every rank r at micro-step m of optimiser step s trains on ``micro_batch(s, m, r)``; the single-process reference
trains on the concatenation of those micro-batches (the same global batch), with the loss averaged the same way
DeepSpeed averages (mean over micro-batches and ranks of each micro-batch's mean token loss).
"""
from __future__ import annotations

import os
import socket

import deepspeed
import torch

import ds_orthoadam
from ds_orthoadam import ds_internals
from ds_orthoadam.orthoadam import OrthoAdam

WORLD_SIZE = 2
GRAD_ACCUM = 2
MICRO_BATCH = 2
SEQ_LEN = 16
VOCAB = 256
STEPS = 20
LR = 1e-3
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
# Small enough that the global gradient norm of these tiny models exceeds it: clipping is active (checked).
CLIP = 0.5
ROTATION = "dense"
SEED = 1234
# fp16: a loss scale of 2^8 that only changes on overflow (halved at once), so that an injected overflow is the only
# skipped step.
FP16 = {"initial_scale_power": 8, "loss_scale_window": 1000, "hysteresis": 1, "min_loss_scale": 1}


# Narrower and shallower than the zoo's "-tiny" models: on 2 shared cores the rotations of the test runs dominate.
_SHRINK = {"llama": {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2},
           "gpt2": {"n_embd": 64, "n_inner": 128, "n_layer": 2}}


def tiny_model(family: str) -> torch.nn.Module:
    """A tiny softmax-1 ``llama`` or ``gpt2`` (tied embeddings), identically initialised in every process."""
    torch.manual_seed(0)
    return ds_orthoadam.build_model(f"{family}-tiny", attention="softmax1", vocab_size=VOCAB, max_seq_len=SEQ_LEN,
                                    **_SHRINK[family])


def micro_batch(step: int, micro: int, rank: int) -> torch.Tensor:
    """Token ids ``[MICRO_BATCH, SEQ_LEN]`` for one rank's micro-step (deterministic, independent of the process)."""
    generator = torch.Generator().manual_seed(1_000_003 * step + 1009 * micro + rank)
    return torch.randint(0, VOCAB, (MICRO_BATCH, SEQ_LEN), generator=generator)


def loss_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


def ds_config(stage: int, optimizer: str = "OrthoAdam", precision: str = "fp32") -> dict:
    params = {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY}
    if optimizer == "OrthoAdam":
        params.update(rotation=ROTATION, seed=SEED)
    else:
        params["torch_adam"] = True
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": GRAD_ACCUM,
        "gradient_clipping": CLIP,
        "optimizer": {"type": optimizer, "params": params},
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", **FP16},
        "steps_per_print": 10**9,
    }


def reference_run(family: str, steps: int = STEPS, skipped_steps: tuple[int, ...] = ()) -> tuple[dict, list]:
    """Single-process ``ds_orthoadam.OrthoAdam`` on the same global batches: (final state dict, clip flags).

    ``skipped_steps``: optimiser steps whose batch is dropped (what a DeepSpeed overflow skip must equal).
    """
    model = tiny_model(family)
    optimizer = OrthoAdam(model.named_parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                          rotation=ROTATION, seed=SEED)
    clipped = []
    for step in range(steps):
        if step in skipped_steps:
            continue
        micro_batches = [micro_batch(step, m, r) for r in range(WORLD_SIZE) for m in range(GRAD_ACCUM)]
        loss = sum(loss_of(model, tokens) for tokens in micro_batches) / len(micro_batches)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        clipped.append(bool(norm > CLIP))
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, clipped


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def relative_update_error(final: dict, reference: dict, initial: dict) -> float:
    """||final - reference|| / ||reference - initial|| over all weights: the error relative to what training moved.

    The bf16 measure: bf16 weights carry a rounding of ~2^-9 of their own size (e.g. 0.002 on a norm gain of 1),
    so a max-abs comparison would measure the storage format rather than the optimiser.
    """
    def flat(state_dict: dict) -> torch.Tensor:
        return torch.cat([state_dict[k].float().flatten() for k in sorted(state_dict)])

    return ((flat(final) - flat(reference)).norm() / (flat(reference) - flat(initial)).norm()).item()


def init_single_rank_process_group() -> None:
    """A one-rank gloo process group in this process (idempotent), for in-process DeepSpeed engines."""
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ds_internals.skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")
