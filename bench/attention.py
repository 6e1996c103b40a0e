"""Forward+backward time and memory of softmax-1 attention versus standard (causal SDPA) softmax attention.

Prints, for T = 256 and 1024, each implementation's time and memory as ratios to the standard SDPA softmax run
in the same process. Memory is the bytes autograd keeps for the backward pass (counted with saved-tensor hooks,
so it works on CPU and GPU alike), plus the CUDA peak on a GPU. "B*H*T*T saved" marks whether any saved tensor is
as large as the attention probabilities, i.e. whether they were materialised (a padding mask, shared by all
heads, is B*T*(T+1) and does not count).

    python bench/attention.py [--batch 4] [--heads 8] [--head-dim 64] [--repeats 5] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from ds_orthoadam.attention import softmax1_eager_attention, softmax1_sdpa_attention


class _Module(nn.Module):
    num_key_value_groups = 1


def standard_sdpa(module, q, k, v, mask, scaling):
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    return out.transpose(1, 2), None


# name -> (function, whether it gets an explicit boolean mask). transformers hands the attention function no mask
# for a purely causal (packed, unpadded) batch, which is the training case; a padded batch gets a mask.
IMPLEMENTATIONS = {
    "softmax (SDPA, baseline)": (standard_sdpa, False),
    "softmax1_sdpa (causal)": (softmax1_sdpa_attention, False),
    "softmax1_sdpa (padding mask)": (softmax1_sdpa_attention, True),
    "softmax1_eager": (softmax1_eager_attention, False),
}


def _saved_bytes_and_probabilities(fn, args, probabilities_numel: int) -> tuple[int, bool]:
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out, _ = fn(*args)
    unique = {t.untyped_storage().data_ptr(): t for t in saved}
    total = sum(t.untyped_storage().nbytes() for t in unique.values())
    materialised = any(t.numel() >= probabilities_numel for t in saved)
    del out
    return total, materialised


def _time_fwd_bwd_once(fn, args, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out, _ = fn(*args)
    out.float().sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _cuda_peak(fn, args) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, _ = fn(*args)
    out.float().sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run(length: int, args: argparse.Namespace) -> None:
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    gen = torch.Generator(device=args.device).manual_seed(0)
    shape = (args.batch, args.heads, length, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device=args.device, dtype=dtype).requires_grad_() for _ in range(3))
    causal = torch.ones(length, length, dtype=torch.bool, device=args.device).tril()
    mask = causal.expand(args.batch, 1, length, length)
    module = _Module()
    calls = {name: (fn, (module, q, k, v, mask if masked else None, args.head_dim**-0.5))
             for name, (fn, masked) in IMPLEMENTATIONS.items()}
    # Interleave the implementations round by round so that load from other processes hits all of them alike.
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(args.repeats + 1):
        for name, (fn, call) in calls.items():
            seconds = _time_fwd_bwd_once(fn, call, args.device)
            if round_index > 0:  # round 0 is warm-up
                times[name].append(seconds)
    results = {}
    for name, (fn, call) in calls.items():
        saved, square = _saved_bytes_and_probabilities(fn, call, args.batch * args.heads * length * length)
        peak = _cuda_peak(fn, call) if args.device == "cuda" else None
        results[name] = (statistics.median(times[name]), saved, square, peak)
    base_time, base_saved, _, base_peak = results["softmax (SDPA, baseline)"]
    print(f"\nT = {length}  (batch {args.batch}, heads {args.heads}, head dim {args.head_dim}, {dtype}, {args.device})")
    print(f"{'implementation':28s} {'time x':>8s} {'saved-for-backward x':>21s} {'B*H*T*T saved':>14s}"
          + (f" {'CUDA peak x':>12s}" if args.device == "cuda" else ""))
    for name, (seconds, saved, square, peak) in results.items():
        line = f"{name:28s} {seconds / base_time:8.2f} {saved / base_saved:21.2f} {str(square):>14s}"
        if peak is not None:
            line += f" {peak / base_peak:12.2f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    for length in args.lengths:
        run(length, args)


if __name__ == "__main__":
    main()
