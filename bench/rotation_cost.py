"""What OrthoAdam's rotations cost per optimiser step on a GPU, estimated from arithmetic (no GPU needed).

    PYTHONPATH=. python bench/rotation_cost.py [--tokens-per-rank 16384] [--train-tflops 50] [--fp32-tflops 13]
                                               [--bandwidth-gbs 900] [--models llama-60m ...]

Per model size and rotation kind, one optimiser step rotates every gradient once and every parameter back once
(ZeRO-0/1; see ``ds_orthoadam.zero_orthoadam``), in fp32:

* dense axes are GEMMs: 2 * numel * n FLOPs per dense axis of length n per rotation, compute-bound, timed at
  ``--fp32-tflops`` (V100: 15.7 peak, about 13 reached by large fp32 GEMMs; V100s have no TF32 tensor cores);
* Hadamard axes are small GEMMs, one pass over the parameter per Kronecker block plus one per sign vector, each pass
  reading and writing fp32 (8 bytes per element), memory-bound at ``--bandwidth-gbs`` (V100 SXM2: 900 GB/s peak);

against a training step of 6 * N * tokens FLOPs per rank at ``--train-tflops`` (V100 fp16 tensor cores at 40% MFU:
50). These are estimates to choose a rotation kind before renting GPUs; ``bench/gpu_zero.sh`` measures the real
thing (tokens/s of AdamW and of OrthoAdam with each kind).
"""
from __future__ import annotations

import argparse

import torch

from ds_orthoadam import MODEL_SPECS, build_model
from ds_orthoadam.rotations import (
    DEFAULT_MAX_DENSE_DIM,
    DEFAULT_MAX_ROTATED_DIM,
    axis_kind,
    make_rotation,
    matrix_view,
)


def dense_gemm_flops(named_shapes: list[tuple[str, torch.Size]]) -> float:
    """FLOPs of one rotation of every parameter with ``rotation="dense"`` (long axes' Hadamard passes excluded)."""
    flops = 0.0
    for _, shape in named_shapes:
        numel = shape.numel()
        for size in matrix_view(shape):
            if size > 1 and axis_kind("dense", size, DEFAULT_MAX_DENSE_DIM) == "dense":
                flops += 2.0 * numel * size
    return flops


def hadamard_passes_bytes(named_shapes: list[tuple[str, torch.Size]], max_rotated_dim: int | None) -> float:
    """Bytes moved by one rotation of every parameter with ``rotation="hadamard"``: one fp32 read and write of the
    parameter per Kronecker block, sign vector and window pass (an identity axis costs one reordering copy)."""
    total = 0.0
    for name, shape in named_shapes:
        rotation = make_rotation(shape, "hadamard", key=name, max_rotated_dim=max_rotated_dim)
        # A window axis: three window passes; an identity axis: the one copy that cycles its index digit.
        passes = sum(len(axis.factors) or (3 if axis.windows else 1) for axis in rotation.axes)
        passes += sum(axis.signs is not None for axis in rotation.axes)
        total += 8.0 * shape.numel() * passes
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama-60m", "llama-130m", "llama-350m", "llama-1.4b"],
                        choices=sorted(MODEL_SPECS))
    parser.add_argument("--tokens-per-rank", type=int, default=16384)
    parser.add_argument("--train-tflops", type=float, default=50.0)
    parser.add_argument("--fp32-tflops", type=float, default=13.0)
    parser.add_argument("--bandwidth-gbs", type=float, default=900.0)
    args = parser.parse_args()

    print(f"estimates: training {args.train_tflops:g} TFLOP/s per GPU, fp32 GEMMs {args.fp32_tflops:g} TFLOP/s, "
          f"{args.bandwidth_gbs:g} GB/s, {args.tokens_per_rank} tokens per rank per step; two rotations per step")
    for name in args.models:
        with torch.device("meta"):
            model = build_model(name)
        named_shapes = [(n, p.shape) for n, p in model.named_parameters()]
        n_params = sum(shape.numel() for _, shape in named_shapes)
        train_seconds = 6.0 * n_params * args.tokens_per_rank / (args.train_tflops * 1e12)
        dense_seconds = 2 * dense_gemm_flops(named_shapes) / (args.fp32_tflops * 1e12)
        default, every_axis = (2 * hadamard_passes_bytes(named_shapes, limit) / (args.bandwidth_gbs * 1e9)
                               for limit in (DEFAULT_MAX_ROTATED_DIM, None))
        print(f"{name:12s} {n_params / 1e6:7.0f}M params | training step {train_seconds:6.3f} s | "
              f"dense +{dense_seconds / train_seconds:.0%} | hadamard +{default / train_seconds:.1%} "
              f"(vocabulary axis rotated too: +{every_axis / train_seconds:.1%})")


if __name__ == "__main__":
    main()
