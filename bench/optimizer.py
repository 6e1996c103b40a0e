"""One optimiser step over llama-60m's parameters: OrthoAdam (dense, hadamard) versus torch.optim.AdamW(foreach).

Prints the median step time of each optimiser (same process, same gradients) as a ratio to AdamW, and the extra
persistent memory OrthoAdam keeps besides AdamW-sized moments: the rotations and two scratch buffers the size of
the largest parameter (AdamW's own per-step temporaries are not counted for either).

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/optimizer.py [--steps 5] [--model llama-60m]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ds_orthoadam import OrthoAdam

LLAMA_60M = dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8,
                 num_hidden_layers=8, vocab_size=32000)


def build_llama_60m() -> torch.nn.Module:
    return LlamaForCausalLM(LlamaConfig(**LLAMA_60M))


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def median_step_seconds(make: Callable[[], torch.optim.Optimizer], model: torch.nn.Module,
                        grads: list[torch.Tensor], steps: int) -> tuple[float, torch.optim.Optimizer]:
    """Median wall time of ``steps`` optimiser steps after one warm-up step (which allocates state)."""
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    optimizer = make()
    optimizer.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per optimiser (median is reported)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_llama_60m()
    grads = [torch.randn_like(p) * 1e-3 for p in model.parameters()]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"llama-60m: {n_params / 1e6:.1f}M parameters, {torch.get_num_threads()} thread(s), "
          f"median of {args.steps} steps")

    candidates = {
        "AdamW(foreach)": lambda: torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True),
        "OrthoAdam dense": lambda: OrthoAdam(model.named_parameters(), lr=1e-6, rotation="dense"),
        "OrthoAdam hadamard": lambda: OrthoAdam(model.named_parameters(), lr=1e-6, rotation="hadamard"),
    }
    baseline_seconds = baseline_state = None
    for name, make in candidates.items():
        seconds, optimizer = median_step_seconds(make, model, grads, args.steps)
        is_ortho = isinstance(optimizer, OrthoAdam)
        rotation_bytes = optimizer.rotation_nbytes() if is_ortho else 0
        workspace_bytes = optimizer.workspace_nbytes() if is_ortho else 0
        state = state_nbytes(optimizer)
        if baseline_seconds is None:
            baseline_seconds, baseline_state = seconds, state
        extra = state - baseline_state + rotation_bytes + workspace_bytes
        print(f"{name:20s} {seconds * 1e3:8.1f} ms/step {seconds / baseline_seconds:6.2f}x AdamW   "
              f"extra memory {extra / 2**20:6.1f} MiB = {100 * extra / baseline_state:4.1f}% of AdamW's state "
              f"(rotations {rotation_bytes / 2**20:.1f} MiB, scratch {workspace_bytes / 2**20:.1f} MiB)")
        del optimizer


if __name__ == "__main__":
    main()
