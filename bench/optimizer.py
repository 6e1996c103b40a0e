"""One optimiser step over llama-60m's parameters: OrthoAdam (dense, hadamard) versus torch.optim.AdamW(foreach).

Prints the median step time of each optimiser (same process, same gradients, rounds per OrthoAdam variant, each with
its own AdamW baselines) as a ratio to AdamW(foreach), then the median and range of that ratio over the rounds (a
shared machine moves it from round to round), and the extra persistent memory OrthoAdam keeps besides
AdamW-sized moments: the rotations and two scratch buffers the size of the largest parameter (AdamW's own per-step
temporaries are not counted for either). OrthoAdam does its moment
math with torch's fused AdamW kernel, so AdamW(fused) is shown as a second reference. Each rotation kind is run with
the vocabulary axis left unrotated (the default: it is longer than max_rotated_dim) and with every axis rotated
(max_rotated_dim=None, what runs before that option did).

On the CPU the rotations run in a compiled tiled kernel (ds_orthoadam/kron_cpu.py) when a C++ compiler is present.
Each round also prints a lower bound for any implementation of the same Q on this machine: AdamW(fused)'s measured
time plus, per rotation (two per step), the dense (Haar) Kronecker blocks' multiply-adds at the FMA rate of a large
GEMM and one read+write pass over all parameters (both measured here; butterflies and further passes are left out).

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/optimizer.py [--steps 5] [--rounds 3] [--rotations dense hadamard]
                                                             [--vocabulary unrotated rotated] [--model llama-60m]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ds_orthoadam import MODEL_SPECS, OrthoAdam, build_model
from ds_orthoadam.rotations import DEFAULT_MAX_ROTATED_DIM, make_rotation

# The vocabulary axis' treatment -> max_rotated_dim.
VOCABULARY_AXIS = {"unrotated": DEFAULT_MAX_ROTATED_DIM, "rotated": None}


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def interleaved_median_seconds(optimizers: dict[str, torch.optim.Optimizer], steps: int) -> dict[str, float]:
    """Median step time per optimiser; steps are taken round-robin so that load from other processes on the
    machine hits every optimiser alike. One untimed warm-up step each allocates the state."""
    for optimizer in optimizers.values():
        optimizer.step()
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(steps):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def dense_multiply_adds(model: torch.nn.Module, kind: str, max_rotated_dim: int | None) -> int:
    """Multiply-adds of one rotation of every parameter from its dense (Haar) Kronecker blocks: a block of size f
    costs f per element. Hadamard blocks and odd blocks (Hadamard windows: butterflies on the CPU) are left out."""
    total = 0
    for name, p in model.named_parameters():
        rotation = make_rotation(p.shape, kind, 0, name, max_rotated_dim=max_rotated_dim)
        for axis in rotation.axes:
            total += p.numel() * sum(f.shape[0] for f in axis.factors
                                     if not axis.is_hadamard(f) and not axis.is_odd_windows(f))
    return total


def multiply_adds_per_second() -> float:
    """This machine's fp32 multiply-add rate, from a large GEMM (BLAS runs it near the cores' peak)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(3):
        torch.mm(a, b)
    return 3 * 1024**3 / (time.perf_counter() - start)


def copy_seconds(model: torch.nn.Module) -> float:
    """One read+write pass over all parameters."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    out = torch.empty_like(flat)
    out.copy_(flat)
    start = time.perf_counter()
    out.copy_(flat)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per optimiser (median is reported)")
    parser.add_argument("--rotations", nargs="+", default=["dense", "hadamard"], choices=["dense", "hadamard"],
                        help="OrthoAdam rotation kinds to compare with AdamW")
    parser.add_argument("--vocabulary", nargs="+", default=list(VOCABULARY_AXIS), choices=list(VOCABULARY_AXIS),
                        help="run each kind with the vocabulary axis unrotated (the default max_rotated_dim) and/or "
                        "rotated (max_rotated_dim=None)")
    parser.add_argument("--model", default="llama-60m", choices=sorted(MODEL_SPECS), help="model whose parameters")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per OrthoAdam variant, each with fresh baselines (on a shared machine the ratio "
                        "moves from round to round: the summary gives the median and range)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model(args.model)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params / 1e6:.1f}M parameters, {torch.get_num_threads()} thread(s), "
          f"median of {args.steps} interleaved steps")

    # lr=0: every optimiser sees the same parameters and gradients on every step. Each OrthoAdam variant is timed
    # in its own round with fresh AdamW baselines: how fast AdamW(foreach) runs depends on how much memory the
    # process holds (its per-step temporaries are page-faulted in), so all variants at once would skew the baseline.
    ratios: dict[str, list[float]] = {}
    for kind in args.rotations:
        for vocabulary in args.vocabulary:
            for _ in range(args.rounds):
                name, ratio = timed_round(model, kind, vocabulary, args.steps)
                ratios.setdefault(name, []).append(ratio)
    print(f"OrthoAdam step / AdamW(foreach) step over {args.rounds} round(s):")
    for name, values in ratios.items():
        print(f"  {name:38s} median {statistics.median(values):.2f}x, range {min(values):.2f}-{max(values):.2f}x")


def timed_round(model: torch.nn.Module, kind: str, vocabulary: str, steps: int) -> tuple[str, float]:
    """One round: OrthoAdam of this kind and vocabulary-axis treatment against fresh AdamW baselines; prints the
    report and the lower bound, returns the OrthoAdam variant's name and its ratio to AdamW(foreach)."""
    name = f"OrthoAdam {kind}, vocabulary {vocabulary}"
    max_rotated_dim = VOCABULARY_AXIS[vocabulary]
    optimizers: dict[str, torch.optim.Optimizer] = {
        "AdamW(foreach)": torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0, foreach=True),
        "AdamW(fused)": torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0, fused=True),
        name: OrthoAdam(model.named_parameters(), lr=0.0, rotation=kind, max_rotated_dim=max_rotated_dim)}
    seconds = interleaved_median_seconds(optimizers, steps)
    report(optimizers, seconds)
    rotation_floor = (dense_multiply_adds(model, kind, max_rotated_dim) / multiply_adds_per_second()
                      + copy_seconds(model))
    floor = seconds["AdamW(fused)"] + 2 * rotation_floor
    print(f"lower bound for this Q here: {floor / seconds['AdamW(foreach)']:.2f}x AdamW(foreach)\n")
    return name, seconds[name] / seconds["AdamW(foreach)"]


def report(optimizers: dict[str, torch.optim.Optimizer], seconds: dict[str, float]) -> None:
    baseline_seconds, baseline_state = seconds["AdamW(foreach)"], state_nbytes(optimizers["AdamW(foreach)"])
    for name, optimizer in optimizers.items():
        is_ortho = isinstance(optimizer, OrthoAdam)
        rotation_bytes = optimizer.rotation_nbytes() if is_ortho else 0
        workspace_bytes = optimizer.workspace_nbytes() if is_ortho else 0
        extra = state_nbytes(optimizer) - baseline_state + rotation_bytes + workspace_bytes
        print(f"{name:38s} {seconds[name] * 1e3:8.1f} ms/step {seconds[name] / baseline_seconds:6.2f}x AdamW   "
              f"extra memory {extra / 2**20:6.1f} MiB = {100 * extra / baseline_state:4.1f}% of AdamW's state "
              f"(rotations {rotation_bytes / 2**20:.1f} MiB, scratch {workspace_bytes / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
