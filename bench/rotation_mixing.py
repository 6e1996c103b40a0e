"""How well the hadamard rotation kind mixes an axis, and what two better-mixing structured transforms would cost.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/rotation_mixing.py [--sizes 768 1376 2736 5461 512]
                                                                   [--keys 8] [--columns 512] [--repeats 15]
                                                                   [--rounds 3]

The figure is ``n * mean_j sum_i Q_ij^4`` (``ds_orthoadam.rotations.axis_mixing``): Haar ~3, flat columns 1, the
identity n. It is multiplicative over Kronecker factors, which is why today's transform, ``(O_m (x) O_b (x) H) D`` for
n = 2^a m, mixes far less than Haar when m has large factors: f(O_m) f(O_b) with f(O_b) ~2.5 (the Haar block) and
each odd block 1.5-2.9. Candidates (neither is used by training; this script measures them):

* ``two-pass``: ``(O_m' (x) H) D2 P (O_m (x) H) D1``: today's transform without its Haar block, twice, with fresh odd
  blocks and signs and a random permutation P between the passes (the permutation breaks the Kronecker structure, so
  the figure is no longer a product);
* ``windows``: the whole axis as one odd-windows block (``odd_windows_block(n)``: three signed Hadamard transforms
  of width w = 2^floor(log2 n) on [0, w), [n-w, n), [0, w)) times random signs; for powers of two (no overlap) it is
  not defined, today's transform stays.

Each transform is applied along axis 0 of an [n, --columns] fp32 matrix (the other axis left alone, so the ratios
are those of one axis' rotation). Today's transform and both candidates run on the CPU kernel
(``ds_orthoadam.kron_cpu``) where it applies; the permutation of ``two-pass`` is a torch ``index_select``. The
figures are exact: every column of Q, pushed through the same code in chunks (for today's transform this is checked
against ``axis_mixing``). Timings are medians over --repeats interleaved runs in this process, with OrthoAdam's two
CPU scratch buffers; the ratio to today's transform is shown as median (range) over --rounds rounds: only ratios mean
anything on a shared machine.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from ds_orthoadam import rotations as R

# [n, k] -> Q @ [n, k], with a workspace as OrthoAdam uses on the CPU (None: allocate; the result may live in it).
Transform = Callable[[torch.Tensor, R.Workspace | None], torch.Tensor]


def along_axis_0(axis: R._Axis, columns: int) -> Transform:
    """Apply ``axis`` along dim 0 of [n, columns] matrices (an identity second axis: the kernel still applies)."""
    rotation = R.Rotation(torch.Size((axis.size, columns)), [axis, R._Axis(columns)])
    return rotation.rotate


def today(n: int, key: str) -> R._Axis:
    return R._hadamard_axis(n, R._generator(0, key, (n,), 0, "hadamard"), "cpu", torch.float32, R.ROTATION_VERSION)


def without_haar_block(axis: R._Axis) -> R._Axis:
    """``axis`` with its Haar power-of-two block replaced by the Hadamard block of the same size (when it has odd
    blocks: a pure power of two keeps it, else the transform would be flat)."""
    odd = [f for f in axis.factors if axis.is_odd_windows(f)]
    if not odd or axis.windows is not None:
        return axis
    power_of_two = axis.size // math.prod(f.shape[0] for f in odd)
    hadamard = [R._shared_hadamard(b, "cpu", torch.float32) for b in R._hadamard_block_sizes(power_of_two)]
    return R._Axis(axis.size, factors=odd + hadamard, signs=axis.signs, shared_factor_ids={id(h) for h in hadamard},
                   window_signs=axis.window_signs)


def two_pass(n: int, key: str, columns: int) -> Transform:
    first, second = (along_axis_0(without_haar_block(today(n, f"{key}/{p}")), columns) for p in (1, 2))
    permutation = torch.randperm(n, generator=R._generator(0, key, (n,), 0, "permutation"))

    def apply(x: torch.Tensor, workspace: R.Workspace | None) -> torch.Tensor:
        y = first(x, workspace)
        free = R.Rotation.free_buffer(y, workspace)  # the permuted copy goes into the other buffer
        permuted = torch.index_select(y, 0, permutation, out=None if free is None else free.view(y.shape))
        return second(permuted, workspace)

    return apply


def windows_block(n: int, key: str, columns: int) -> Transform | None:
    """The whole axis as one odd-windows digit plus signs (kernel WINDOWS digit; the dense matrix is not built: the
    kernel only needs the digit's size, so a zero-width stand-in carries it)."""
    if n & (n - 1) == 0:
        return None
    generator = R._generator(0, key, (n,), 0, "windows")
    width = R.window_width(n)
    signs = torch.stack([R._random_signs(width, generator) for _ in range(3)]) / math.sqrt(width)
    stand_in = torch.empty(n, 0)
    axis = R._Axis(n, factors=[stand_in], signs=R._random_signs(n, generator).float(),
                   window_signs={id(stand_in): signs.reshape(-1).float()})
    return along_axis_0(axis, columns)


def figure(transform: Transform, n: int, chunk: int) -> float:
    """sum_ij Q_ij^4 from Q's columns, ``chunk`` at a time (needs a transform built for ``chunk`` columns)."""
    total = 0.0
    for start in range(0, n, chunk):
        block = torch.zeros(n, chunk)
        width = min(chunk, n - start)
        block[torch.arange(start, start + width), torch.arange(width)] = 1.0
        total += float(transform(block, None)[:, :width].double().pow(4).sum())
    return total


def median_seconds(transforms: dict[str, Transform], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median time per transform, interleaved (machine load affects every variant alike) after one warm-up each,
    with OrthoAdam's two CPU scratch buffers (so no variant pays for fresh pages)."""
    workspace = R.ScratchBuffers().get(x.numel(), x.device, x.dtype)
    times: dict[str, list[float]] = {name: [] for name in transforms}
    for round_ in range(repeats + 1):
        for name, transform in transforms.items():
            start = time.perf_counter()
            transform(x, workspace)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[768, 1376, 2736, 5461, 512])
    parser.add_argument("--keys", type=int, default=8, help="parameter names (random draws) per size and transform")
    parser.add_argument("--columns", type=int, default=512, help="columns of the timed matrix")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds; the ratio's median and range are shown")
    args = parser.parse_args()
    chunk = 256
    print(f"mixing n*sum(q^4) (Haar ~3), mean [min-max] over {args.keys} keys; time of one axis rotation of an "
          f"[n, {args.columns}] fp32 matrix relative to today's transform (median of {args.repeats} runs; median "
          f"(range) over {args.rounds} rounds)")
    for n in args.sizes:
        builders = {"today": lambda key, k: along_axis_0(today(n, key), k),
                    "two-pass": lambda key, k: two_pass(n, key, k),
                    "windows": lambda key, k: windows_block(n, key, k)}
        figures: dict[str, list[float]] = {}
        for name, build in builders.items():
            if build("k0", chunk) is None:
                continue
            figures[name] = [figure(build(f"k{i}", chunk), n, chunk) for i in range(args.keys)]
        exact = [R.axis_mixing(today(n, f"k{i}")) for i in range(args.keys)]
        assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(exact, figures["today"])), (exact, figures)
        x = torch.randn(n, args.columns)
        timed = {name: builders[name]("k0", args.columns) for name in figures}
        rounds = [median_seconds(timed, x, args.repeats) for _ in range(args.rounds)]
        ratios = {name: sorted(r[name] / r["today"] for r in rounds) for name in figures}
        cells = [f"{name} {statistics.mean(v):5.2f} [{min(v):.2f}-{max(v):.2f}] "
                 f"{statistics.median(ratios[name]):.2f}x ({ratios[name][0]:.2f}-{ratios[name][-1]:.2f}x)"
                 for name, v in figures.items()]
        today_ms = 1e3 * statistics.median(r["today"] for r in rounds)
        print(f"n={n:5d} ({n // (n & -n)} x 2^{(n & -n).bit_length() - 1}) | " + " | ".join(cells)
              + f" | today {today_ms:.2f} ms", flush=True)

if __name__ == "__main__":
    main()
