"""What OrthoAdam adds to a DeepSpeed training step, as a fraction of the step (CPU; run from the repository root).

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python bench/zero.py [--model llama-60m] [--micro-tokens 256]

(One thread: on a shared machine multi-threaded forward/backward times swing far more than the rotations'.)

Measured in this process, each as the minimum over ``--repeats`` interleaved rounds:

* ``fwd_bwd``: forward + backward of one micro-batch of ``--micro-tokens`` tokens (the baseline's compute);
* ``adamw``: one torch AdamW step over all parameters (what DeepSpeed's AdamW does, summed over ranks);
* ``rotate``: rotating every gradient and ``unrotate``: rotating every parameter back (once per optimiser step),
  for dense and Hadamard rotations, each with the vocabulary axis left unrotated (the default ``max_rotated_dim``)
  or rotated too (``max_rotated_dim=None``);
* inside DeepSpeed (ZeRO-1, one rank, 2 micro-batches per step, same config but the optimiser name): each
  micro-batch's ``engine.backward`` and ``engine.step`` with AdamW and with OrthoAdam, as a check that the
  components add up where the integration says they are paid.

A full step at the paper's 16384 tokens per rank is composed as ``16384/micro_tokens * fwd_bwd + adamw``. With k
micro-batches per step (gradient accumulation), OrthoAdam (rotated frame, this project) adds per step
``rotate + unrotate`` where DeepSpeed reduces the accumulated gradient once at the boundary (ZeRO 0 and ZeRO 1,
with or without ``overlap_comm``: the step's gradient is rotated once, right before that reduction) and
``k * rotate + unrotate`` where DeepSpeed takes every micro-batch's gradient during its backward (ZeRO-2, bf16 with
fp32 gradient accumulation: a tensor hook per micro-batch). The alternative re-parametrisation theta = R(phi) adds
``k * (rotate + unrotate)`` (theta = Q^T phi in every forward, Q g in every backward). Memory: rotations (not
sharded) and the ZeRO-1 optimiser state per rank.

ZeRO-3 rows (``--zero3``): one-rank ZeRO-3 engines with every parameter released after use
(``stage3_param_persistence_threshold`` 0, as for a model too large to keep any whole), AdamW and OrthoAdam with
dense and Hadamard rotations, built in this process and timed interleaved per micro-batch (forward, backward, step).
OrthoAdam there pays per micro-batch ``rotate + 2 unrotate`` (each gather for forward and for backward yields
theta = Q^T phi; each micro-batch's gradient is rotated before the reduce-scatter) and nothing extra per step; the
rows give that extra time against the AdamW ZeRO-3 engine's own 16384-token step (16384/micro_tokens micro-batches
plus its step). One rank gathers nothing, so communication (the same for both optimisers) is not in the step.
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
from ds_orthoadam.zero_orthoadam import RotatedFrame, RotationSpec

PAPER_TOKENS_PER_RANK = 16384
ROTATION_VARIANTS = {f"{kind}, vocabulary {vocabulary}": RotationSpec(kind, **limit)
                     for kind in ("dense", "hadamard")
                     for vocabulary, limit in (("unrotated", {}), ("rotated", {"max_rotated_dim": None}))}
SEQ_LEN = 256
ENGINE_ACCUMULATION = 2


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
    frames = {label: RotatedFrame(model.named_parameters(), spec) for label, spec in ROTATION_VARIANTS.items()}
    tasks = {"fwd_bwd": fwd_bwd, "adamw": adamw.step}
    for label, frame in frames.items():
        tasks[f"rotate_{label}"] = frame.rotate_gradients_  # the gradients stay finite: Q is orthogonal
        tasks[f"unrotate_{label}"] = frame.unrotate_params_
    timings = interleaved_best_times(tasks, repeats)
    for label, frame in frames.items():
        timings[f"rotation_bytes_{label}"] = frame.nbytes
        timings[f"scratch_bytes_{label}"] = frame.scratch.nbytes
    return timings


def build_engine(name: str, optimizer: str, tokens: torch.Tensor, stage: int = 1, rotation: str = "dense"):
    """A one-rank DeepSpeed engine (ENGINE_ACCUMULATION micro-batches per step); the engines compared differ only
    in the optimiser (and OrthoAdam's rotation kind). ZeRO-3: no parameter persists between uses."""
    torch.manual_seed(0)
    model = ds_orthoadam.build_model(name)
    params = {"lr": 1e-4, "weight_decay": 0.1}
    if optimizer == "AdamW":
        params["torch_adam"] = True
    else:
        params["rotation"] = rotation
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    config = {"train_micro_batch_size_per_gpu": tokens.shape[0], "gradient_accumulation_steps": ENGINE_ACCUMULATION,
              "gradient_clipping": 1.0, "zero_optimization": zero, "steps_per_print": 10**9,
              "optimizer": {"type": optimizer, "params": params}}
    engine, *_ = ds_orthoadam.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def measure_in_engines(name: str, tokens: torch.Tensor, repeats: int) -> tuple[dict[str, float], bool]:
    """Per micro-batch engine.backward and engine.step times of AdamW and OrthoAdam engines, alternating between
    the two; and whether the OrthoAdam engine rotates the gradient once per step."""
    engines = {optimizer: build_engine(name, optimizer, tokens) for optimizer in ("AdamW", "OrthoAdam")}
    return time_engines(engines, tokens, repeats), engines["OrthoAdam"].orthoadam_hooks.rotates_once_per_step


ZERO3_ENGINES = {"AdamW": ("AdamW", "dense"), "OrthoAdam dense": ("OrthoAdam", "dense"),
                 "OrthoAdam hadamard": ("OrthoAdam", "hadamard")}


def measure_zero3(name: str, tokens: torch.Tensor, repeats: int) -> dict[str, float]:
    """Per micro-batch forward, backward and step times of one-rank ZeRO-3 engines (see the module doc)."""
    engines = {label: build_engine(name, optimizer, tokens, stage=3, rotation=rotation)
               for label, (optimizer, rotation) in ZERO3_ENGINES.items()}
    return time_engines(engines, tokens, repeats)


def print_zero3(name: str, tokens: torch.Tensor, repeats: int) -> None:
    e = measure_zero3(name, tokens, repeats)
    micro = range(ENGINE_ACCUMULATION)

    def per_micro_batch(label: str) -> float:  # forward + backward + non-boundary step, mean over micro-batches
        return sum(e[f"forward{m}_{label}"] + e[f"backward{m}_{label}"] for m in micro) / ENGINE_ACCUMULATION

    def per_step(label: str) -> float:  # the boundary micro-batch's engine.step (the optimiser step)
        return e[f"step{ENGINE_ACCUMULATION - 1}_{label}"]

    micro_batches = PAPER_TOKENS_PER_RANK / tokens.numel()
    full_step = micro_batches * per_micro_batch("AdamW") + per_step("AdamW")
    print(f"ZeRO-3, one rank, no persistent parameters, {tokens.numel()} tokens per micro-batch: AdamW fwd+bwd "
          f"{per_micro_batch('AdamW'):.3f} s per micro-batch, step {per_step('AdamW'):.3f} s; a {PAPER_TOKENS_PER_RANK}"
          f"-token step = {micro_batches:g} micro-batches + step = {full_step:.1f} s")
    for label in ZERO3_ENGINES:
        if label == "AdamW":
            continue
        extra_micro = per_micro_batch(label) - per_micro_batch("AdamW")
        extra_step = per_step(label) - per_step("AdamW")
        share = (micro_batches * extra_micro + extra_step) / full_step
        print(f"  {label}: per micro-batch {extra_micro:+.3f} s ({per_micro_batch(label) / per_micro_batch('AdamW'):.3f}"
              f" x AdamW), per step {extra_step:+.3f} s ({per_step(label) / per_step('AdamW'):.3f} x AdamW); extra "
              f"per {PAPER_TOKENS_PER_RANK}-token step {share:.2%} (micro-batches of {tokens.numel()} tokens)")


def time_engines(engines: dict, tokens: torch.Tensor, repeats: int) -> dict[str, float]:
    """Interleaved per micro-batch forward, backward and step times of each engine (keyed ``{task}{micro}_{label}``)."""
    pending = {}

    def forward(optimizer: str):
        engine = engines[optimizer]
        return lambda: pending.__setitem__(optimizer, engine(input_ids=tokens, labels=tokens).loss)

    tasks = {}
    for optimizer, engine in engines.items():
        for micro in range(ENGINE_ACCUMULATION):
            tasks[f"forward{micro}_{optimizer}"] = forward(optimizer)
            tasks[f"backward{micro}_{optimizer}"] = functools.partial(lambda e, o: e.backward(pending[o]), engine,
                                                                      optimizer)
            tasks[f"step{micro}_{optimizer}"] = engine.step
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
    parser.add_argument("--zero3", action="store_true",
                        help="only the ZeRO-3 rows: AdamW vs OrthoAdam (dense, Hadamard) ZeRO-3 engines")
    args = parser.parse_args()
    if args.zero3:
        init_single_rank()
        torch.manual_seed(0)
        print_zero3(args.model, batch(args.micro_tokens, ds_orthoadam.build_model(args.model).config.vocab_size),
                    args.repeats)
        return

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
    for label in ROTATION_VARIANTS:
        rotate, unrotate = t[f"rotate_{label}"], t[f"unrotate_{label}"]
        print(f"{label}: rotate all gradients {rotate:.3f} s, rotate all parameters back {unrotate:.3f} s, "
              f"rotations {t[f'rotation_bytes_{label}'] / 2**20:.2f} MiB + CPU scratch "
              f"{t[f'scratch_bytes_{label}'] / 2**20:.0f} MiB per rank (not sharded)")
        for k in args.accumulation:
            once_per_step = (rotate + unrotate) / full_step
            per_micro_batch = (k * rotate + unrotate) / full_step
            reparametrised = k * (rotate + unrotate) / full_step
            print(f"  accumulation {k:>2}: OrthoAdam extra per step / full step = {once_per_step:.2%} at ZeRO 0/1, "
                  f"{per_micro_batch:.2%} at ZeRO-2 (re-parametrisation theta=R(phi): "
                  f"{reparametrised:.2%})")

    bytes_unsharded = 3 * 4 * n_params  # fp32 master + exp_avg + exp_avg_sq
    print("ZeRO-1 optimiser state per rank (fp32 master + moments): " + ", ".join(
        f"N={n}: {bytes_unsharded / n / 2**20:.0f} MiB" for n in (1, 2, 8)) + " (same for AdamW and OrthoAdam)")

    if not args.skip_engine:
        init_single_rank()
        e, once_per_step = measure_in_engines(args.model, tokens, args.repeats)
        print(f"in DeepSpeed ZeRO-1, one rank, {ENGINE_ACCUMULATION} micro-batches per step, dense, gradient rotated "
              f"{'once per step' if once_per_step else 'per micro-batch'}; OrthoAdam - AdamW per micro-batch "
              f"(component rotate {t['rotate_dense, vocabulary unrotated']:.3f} s, "
              f"unrotate {t['unrotate_dense, vocabulary unrotated']:.3f} s):")
        for micro in range(ENGINE_ACCUMULATION):
            backward, step = (e[f"{task}{micro}_OrthoAdam"] - e[f"{task}{micro}_AdamW"]
                              for task in ("backward", "step"))
            print(f"  micro-batch {micro}{' (boundary)' if micro == ENGINE_ACCUMULATION - 1 else ''}: engine.backward "
                  f"{backward:+.3f} s of {e[f'backward{micro}_AdamW']:.3f} s, engine.step {step:+.3f} s of "
                  f"{e[f'step{micro}_AdamW']:.3f} s")


if __name__ == "__main__":
    main()
