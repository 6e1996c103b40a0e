"""CPU fast path for OrthoAdam's Kronecker-structured rotations (``csrc/kron_cpu.cpp``), built on first use.

A Hadamard rotation is a chain of small Kronecker factors. As one GEMM per factor (the path accelerators use), every
factor is a pass over memory and CPU BLAS runs these small-K GEMMs far below its peak, which made OrthoAdam's CPU
step several times AdamW's. The C++ kernel applies all factors of an axis to cache-sized tiles (Hadamard factors as
butterflies), so a rotation costs a few memory passes. It computes the same Q; results differ from the GEMM path
only by floating-point rounding.

The library is plain C++ (no torch headers, so it compiles in seconds), built by torch's own extension builder
(``torch.utils.cpp_extension.load``: ninja, a per-user cache, a lock for concurrent ranks) and called through ctypes,
which releases the GIL. If no compiler is available the build fails once, a warning names the cause, and rotations
use the GEMM path. ``DS_ORTHOADAM_CPU_KERNEL=0`` turns the fast path off.
"""
from __future__ import annotations

import ctypes
import math
import os
import platform
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "kron_cpu.cpp"
DISABLE_ENV = "DS_ORTHOADAM_CPU_KERNEL"
IDENTITY, DENSE, HADAMARD, WINDOWS = 0, 1, 2, 3
# Dense factors wider than this (the "dense" rotation kind) are left to BLAS, which is efficient at large K.
MAX_FACTOR = 64
_C_TYPES = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}
_SYMBOLS = {torch.float32: "dso_kron_apply_f32", torch.float64: "dso_kron_apply_f64"}

_library: ctypes.CDLL | None = None
_unavailable = False


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the pip-installed one (a DeepSpeed dependency) sits in the venv's
    bin folder, which is not on PATH when the venv's python is run directly (as ``make test`` does)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _has_avx2_fma() -> bool:
    """Whether this is an x86 CPU with AVX2 and FMA (every x86 server CPU since 2013). Elsewhere the kernel is built
    as portable code, never with -march=native: a build cache can be shared between machines."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return {"avx2", "fma"} <= set(flags)


def _build() -> ctypes.CDLL:
    from torch.utils import cpp_extension

    _ninja_on_path()

    flags = ["-O3", "-std=c++17", "-fopenmp", "-Wno-psabi"]
    name = "ds_orthoadam_kron_cpu"
    if _has_avx2_fma():  # a separate build: the cache may be shared with machines without them
        flags += ["-mavx2", "-mfma"]
        name += "_avx2"
    # OpenMP: torch's own libgomp is already loaded, so torch.set_num_threads sizes the kernel's thread pool too.
    path = cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                              is_python_module=False, verbose=False)
    return load(path)


def load(path: str | os.PathLike) -> ctypes.CDLL:
    """A compiled kernel library with its entry points' C signatures declared."""
    library = ctypes.CDLL(str(path))
    for dtype, symbol in _SYMBOLS.items():
        pointer = ctypes.POINTER(_C_TYPES[dtype])
        axis = [ctypes.c_int32, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int32),
                ctypes.POINTER(pointer), pointer]
        getattr(library, symbol).argtypes = [pointer, pointer, ctypes.c_int64, ctypes.c_int64, *axis, *axis,
                                             ctypes.c_int32]
        getattr(library, symbol).restype = None
    return library


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when it is disabled or cannot be built (warned once)."""
    global _library, _unavailable
    if _library is not None or _unavailable:
        return _library
    if os.environ.get(DISABLE_ENV, "1") == "0":
        _unavailable = True
        return None
    try:
        _library = _build()
    except Exception as error:  # no compiler, no ninja, read-only cache...: the GEMM path still works
        _unavailable = True
        warnings.warn(f"ds_orthoadam: could not build the CPU rotation kernel ({type(error).__name__}: {error}); "
                      f"rotations on the CPU use the slower GEMM path. Install a C++ compiler and ninja, or set "
                      f"{DISABLE_ENV}=0 to skip the attempt.", RuntimeWarning, stacklevel=2)
    return _library


@dataclass(frozen=True)
class AxisDigits:
    """One axis for the kernel: digit sizes, kinds (IDENTITY/DENSE/HADAMARD/WINDOWS), per digit the dense factor or
    the window signs (None for the others), and the axis' sign vector (None: no signs). Factors and signs must be
    contiguous CPU tensors of the kernel's dtype."""

    sizes: tuple[int, ...]
    kinds: tuple[int, ...]
    factors: tuple[torch.Tensor | None, ...]
    signs: torch.Tensor | None

    @property
    def length(self) -> int:
        return math.prod(self.sizes)


class KronPlan:
    """``src -> dst`` for a (rows, cols) matrix: Kronecker factors of both axes with signs first (``signs_last``
    False) or last. ``out_axis`` is None for vectors. Holds the ctypes arguments (and references to the tensors they
    point into) so a call costs microseconds."""

    def __init__(self, out_axis: AxisDigits | None, in_axis: AxisDigits, signs_last: bool, dtype: torch.dtype):
        self.rows = out_axis.length if out_axis is not None else 1
        self.cols = in_axis.length
        self.dtype = dtype
        self._keep = [t for axis in (out_axis, in_axis) if axis is not None
                      for t in (*axis.factors, axis.signs) if t is not None]
        self._args = [*self._axis_args(out_axis), *self._axis_args(in_axis)]
        self._signs_last = int(signs_last)

    def _axis_args(self, axis: AxisDigits | None) -> list:
        c_type = ctypes.POINTER(_C_TYPES[self.dtype])
        if axis is None:
            return [0, None, None, None, None]
        count = len(axis.sizes)
        factors = [ctypes.cast(f.data_ptr(), c_type) if f is not None else None for f in axis.factors]
        signs = ctypes.cast(axis.signs.data_ptr(), c_type) if axis.signs is not None else None
        return [count, (ctypes.c_int64 * count)(*axis.sizes), (ctypes.c_int32 * count)(*axis.kinds),
                (c_type * count)(*factors), signs]

    def __call__(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        if not (src.is_contiguous() and dst.is_contiguous() and src.dtype == dst.dtype == self.dtype
                and src.numel() == dst.numel() == self.rows * self.cols):
            raise ValueError(f"KronPlan for {self.rows}x{self.cols} {self.dtype} got src {tuple(src.shape)} "
                             f"{src.dtype} and dst {tuple(dst.shape)} {dst.dtype} (both must be contiguous)")
        c_type = ctypes.POINTER(_C_TYPES[self.dtype])
        getattr(library(), _SYMBOLS[self.dtype])(ctypes.cast(src.data_ptr(), c_type),
                                                 ctypes.cast(dst.data_ptr(), c_type), self.rows, self.cols,
                                                 *self._args, self._signs_last)
        return dst


def supports(dtype: torch.dtype) -> bool:
    return dtype in _C_TYPES
