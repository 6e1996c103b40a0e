"""What OrthoAdam adds to a DeepSpeed training step, as a fraction of the step (CPU; run from the repository root).

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=2 python bench/zero.py [--model llama-60m] [--micro-tokens 256]

Measured in this process, each as the minimum over ``--repeats`` interleaved rounds:

* ``fwd_bwd``: forward + backward of one micro-batch of ``--micro-tokens`` tokens (the baseline's compute);
* ``adamw``: one torch AdamW step over all parameters (what DeepSpeed's AdamW does, summed over ranks);
* ``rotate``: rotating every gradient (the per-micro-batch tensor hooks) and ``unrotate``: rotating every parameter
  back (once per optimiser step), for dense and Hadamard rotations;
* inside DeepSpeed (ZeRO-1, one rank, same config but the optimiser name): ``engine.backward`` and ``engine.step``
  with AdamW and with OrthoAdam, as a check that the components add up.

A full step at the paper's 16384 tokens per rank is composed as ``16384/micro_tokens * fwd_bwd + adamw``. OrthoAdam
(rotated frame, this project) adds ``k * rotate + unrotate`` per step with k micro-batches (gradient accumulation);
the alternative re-parametrisation theta = R(phi) adds ``k * (rotate + unrotate)`` (theta = Q^T phi in every forward,
Q g in every backward). Memory: rotations (not sharded) and the ZeRO-1 optimiser state per rank.
"""
from __future__ import annotations

import argparse
import functools
import os
import socket
import time
from typing import Callable

import torch

import ds_orthoadam
from ds_orthoadam import ds_internals
from ds_orthoadam.rotations import rotation_nbytes
from ds_orthoadam.zero_orthoadam import RotatedFrame, RotationSpec

PAPER_TOKENS_PER_RANK = 16384
SEQ_LEN = 256


def interleaved_best_times(tasks: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Minimum time of each task over ``repeats`` rounds; tasks alternate within a round so that a busy machine
    slows the baseline and the rotations alike."""
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, task in tasks.items():
            start = time.perf_counter()
            task()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def batch(micro_tokens: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (max(1, micro_tokens // SEQ_LEN), min(micro_tokens, SEQ_LEN)),
                         generator=torch.Generator().manual_seed(0))


def measure_components(model: torch.nn.Module, tokens: torch.Tensor, repeats: int) -> dict[str, float]:
    def fwd_bwd():
        model.zero_grad(set_to_none=False)
        model(input_ids=tokens, labels=tokens).loss.backward()

    fwd_bwd()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4)
    grads = {name: p.grad for name, p in model.named_parameters()}
    frames = {kind: RotatedFrame(model.named_parameters(), RotationSpec(kind)) for kind in ("dense", "hadamard")}
    tasks = {"fwd_bwd": fwd_bwd, "adamw": adamw.step}
    for kind, frame in frames.items():
        tasks[f"rotate_{kind}"] = functools.partial(rotate_all, frame, grads)
        tasks[f"unrotate_{kind}"] = frame.unrotate_params_
    timings = interleaved_best_times(tasks, repeats)
    for kind, frame in frames.items():
        timings[f"rotation_bytes_{kind}"] = frame.nbytes
    return timings


def rotate_all(frame: RotatedFrame, grads: dict[str, torch.Tensor]) -> None:
    """What the gradient hooks do in one backward: Q g for every parameter."""
    for name, grad in grads.items():
        frame.rotations[name].rotate(grad)


def build_engine(name: str, optimizer: str, tokens: torch.Tensor):
    """A one-rank ZeRO-1 DeepSpeed engine; the two engines compared differ only in the optimiser name."""
    torch.manual_seed(0)
    model = ds_orthoadam.build_model(name)
    params = {"lr": 1e-4, "weight_decay": 0.1}
    if optimizer == "AdamW":
        params["torch_adam"] = True
    config = {"train_micro_batch_size_per_gpu": tokens.shape[0], "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": 1}, "steps_per_print": 10**9,
              "optimizer": {"type": optimizer, "params": params}}
    engine, *_ = ds_orthoadam.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def measure_in_engines(name: str, tokens: torch.Tensor, repeats: int) -> dict[str, float]:
    """engine.backward and engine.step times of AdamW and OrthoAdam engines, alternating between the two."""
    engines = {optimizer: build_engine(name, optimizer, tokens) for optimizer in ("AdamW", "OrthoAdam")}
    pending = {}

    def forward(optimizer: str):
        engine = engines[optimizer]
        return lambda: pending.__setitem__(optimizer, engine(input_ids=tokens, labels=tokens).loss)

    tasks = {}
    for optimizer, engine in engines.items():
        tasks[f"forward_{optimizer}"] = forward(optimizer)
        tasks[f"backward_{optimizer}"] = functools.partial(lambda e, o: e.backward(pending[o]), engine, optimizer)
        tasks[f"step_{optimizer}"] = engine.step
    for task in tasks.values():  # the first step also builds the optimiser state
        task()
    return interleaved_best_times(tasks, repeats)


def init_single_rank() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        os.environ.setdefault(key, value)
    ds_internals.skip_shm_comm_build()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-60m")
    parser.add_argument("--micro-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accumulation", type=int, nargs="+", default=[1, 4, 16],
                        help="micro-batches per optimiser step at which to report the overhead")
    parser.add_argument("--skip-engine", action="store_true", help="skip the in-DeepSpeed cross-check")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = ds_orthoadam.build_model(args.model)
    tokens = batch(args.micro_tokens, model.config.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    t = measure_components(model, tokens, args.repeats)
    micro_per_paper_step = PAPER_TOKENS_PER_RANK / tokens.numel()
    full_step = micro_per_paper_step * t["fwd_bwd"] + t["adamw"]
    print(f"{args.model}: {n_params / 1e6:.1f}M parameters, torch threads {torch.get_num_threads()}")
    print(f"fwd+bwd {tokens.numel()} tokens {t['fwd_bwd']:.3f} s | AdamW step {t['adamw']:.3f} s | "
          f"full step at {PAPER_TOKENS_PER_RANK} tokens/rank = {micro_per_paper_step:g} x fwd+bwd + AdamW "
          f"= {full_step:.1f} s")
    for kind in ("dense", "hadamard"):
        rotate, unrotate = t[f"rotate_{kind}"], t[f"unrotate_{kind}"]
        print(f"{kind}: rotate all gradients {rotate:.3f} s, rotate all parameters back {unrotate:.3f} s, "
              f"rotations {t[f'rotation_bytes_{kind}'] / 2**20:.1f} MiB per rank")
        for k in args.accumulation:
            rotated_frame = (k * rotate + unrotate) / full_step
            reparametrised = k * (rotate + unrotate) / full_step
            print(f"  accumulation {k:>2}: OrthoAdam extra per step / full step = {rotated_frame:.2%} "
                  f"(re-parametrisation theta=R(phi) would add {reparametrised:.2%})")

    bytes_unsharded = 3 * 4 * n_params  # fp32 master + exp_avg + exp_avg_sq
    print("ZeRO-1 optimiser state per rank (fp32 master + moments): " + ", ".join(
        f"N={n}: {bytes_unsharded / n / 2**20:.0f} MiB" for n in (1, 2, 8)) + " (same for AdamW and OrthoAdam); "
        "rotations dense/hadamard "
        f"{rotation_nbytes(model.named_parameters(), 'dense') / 2**20:.1f}/"
        f"{rotation_nbytes(model.named_parameters(), 'hadamard') / 2**20:.2f} MiB per rank (not sharded)")

    if not args.skip_engine:
        init_single_rank()
        e = measure_in_engines(args.model, tokens, args.repeats)
        print("in DeepSpeed ZeRO-1, one rank, dense (OrthoAdam - AdamW): engine.backward "
              f"+{e['backward_OrthoAdam'] - e['backward_AdamW']:.3f} s of {e['backward_AdamW']:.3f} s "
              f"(gradient hooks; component rotate {t['rotate_dense']:.3f} s), engine.step "
              f"+{e['step_OrthoAdam'] - e['step_AdamW']:.3f} s of {e['step_AdamW']:.3f} s "
              f"(rotation back; component unrotate {t['unrotate_dense']:.3f} s)")


if __name__ == "__main__":
    main()
