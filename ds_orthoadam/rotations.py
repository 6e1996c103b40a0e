"""Fixed random orthogonal transforms ("rotations") for OrthoAdam, one per parameter.

OrthoAdam runs Adam in a rotated frame phi = Q theta. A dense Q on a flattened weight is impossible (a 512x512
weight would need a 262144x262144 matrix), so Q is a Kronecker product of one orthogonal matrix per axis:

* the parameter is viewed as a matrix ``(shape[0], prod(shape[1:]))`` (trailing dims flattened, the convention of
  ``nn.Linear``/``nn.Conv*`` where dim 0 is the output) or as a vector when 1-D; 0-D parameters and axes of length 1
  are left unrotated (a 1x1 orthogonal matrix is +-1, a signed permutation, to which Adam is equivariant);
* a matrix G is rotated as ``Q_out @ G @ Q_in^T`` (every coordinate mixes with every other), a vector as ``Q g``.

Axis kinds:

* ``"dense"``: a Haar-random orthogonal matrix (QR of a Gaussian with the sign fix), n*n memory, n^2 cost per
  column. Axes longer than ``max_dense_dim`` (default 4096: the vocabulary axis of the embeddings) use the
  ``"hadamard"`` axis transform instead.
* ``"hadamard"``: a randomised Walsh-Hadamard transform ``H D`` (D = random signs), O(n log n) cost, O(n) memory.
  For a length n that is not a power of two, w = 2^floor(log2 n) > n/2 and three signed Hadamard transforms are
  applied to the overlapping windows ``[0, w)``, ``[n-w, n)``, ``[0, w)``: each is orthogonal on its window and
  the identity elsewhere, and because the windows overlap, after the three passes every output coordinate
  depends on every input coordinate (a block-diagonal scheme would leave coordinates of different blocks unmixed).

Reproducibility rule (what the DeepSpeed integration relies on): the rotation is a pure function of
``(seed, key, shape, kind, max_dense_dim)``. Random numbers come from a CPU ``torch.Generator`` (float64) seeded
with a SHA-256 hash of ``(seed, key, shape, axis index, axis kind)`` -- never Python's salted ``hash()`` -- so it is
identical on every rank, device and restart. ``OrthoAdam`` uses ``key = parameter name`` when given
``model.named_parameters()`` and ``key = f"param{i}"`` otherwise, i being the parameter's position in the
flattened param groups (its id in ``optimizer.state_dict()``).
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable, Sequence

import torch

ROTATION_KINDS = ("dense", "hadamard")
DEFAULT_MAX_DENSE_DIM = 4096
# Hadamard transforms of length 2^k are applied as a Kronecker product of small dense Hadamard blocks (one GEMM
# per block), which is much faster than log2(n) butterfly passes in eager PyTorch; cost stays O(n log n).
_HADAMARD_BLOCK_LOG2 = 5


class RotationKindError(ValueError):
    """An unknown rotation kind was requested."""


def _check_kind(kind: str) -> None:
    if kind not in ROTATION_KINDS:
        raise RotationKindError(
            f"unknown rotation kind {kind!r}: choose one of {', '.join(ROTATION_KINDS)} "
            "(signed permutations are deliberately not offered: Adam is equivariant to them)"
        )


def _generator(seed: int, key: str, shape: Sequence[int], axis: int, axis_kind: str) -> torch.Generator:
    """A CPU generator whose seed is a stable hash of everything that identifies one axis transform."""
    text = f"ds_orthoadam|seed={seed}|key={key}|shape={tuple(shape)}|axis={axis}|kind={axis_kind}"
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def axis_kind(kind: str, size: int, max_dense_dim: int) -> str:
    """The transform used along an axis of ``size``: dense only for the dense kind and short enough axes."""
    return "dense" if kind == "dense" and size <= max_dense_dim else "hadamard"


def _random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).to(torch.float64).mul_(2).sub_(1)


def haar_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-distributed n x n orthogonal matrix (float64): QR of a Gaussian, columns sign-fixed by diag(R)."""
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _apply_matrix(matrix: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
    """``matrix @ x`` along the middle axis of ``x3`` (shape ``(P, n, R)``), using one GEMM where possible."""
    before, n, after = x3.shape
    if before == 1:
        return (matrix @ x3.reshape(n, after)).view(1, n, after)
    if after == 1:
        return (x3.reshape(before, n) @ matrix.T).view(before, n, 1)
    return torch.matmul(matrix, x3)


_SYLVESTER_CACHE: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def _normalised_hadamard(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The symmetric orthonormal Sylvester-Hadamard matrix of a power-of-two ``size`` (cached; shared by all)."""
    cache_key = (size, device, dtype)
    if cache_key not in _SYLVESTER_CACHE:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < size:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _SYLVESTER_CACHE[cache_key] = (h / math.sqrt(size)).to(device=device, dtype=dtype)
    return _SYLVESTER_CACHE[cache_key]


def _block_log2_sizes(log2_n: int) -> list[int]:
    """Split 2^log2_n into as few, as equal as possible Kronecker factors of at most 2^_HADAMARD_BLOCK_LOG2."""
    count = max(1, math.ceil(log2_n / _HADAMARD_BLOCK_LOG2))
    base, extra = divmod(log2_n, count)
    return [base + 1 if i < extra else base for i in range(count)]


def walsh_hadamard(x3: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform along the middle axis (length 2^k) of ``x3`` of shape ``(P, n, R)``.

    H_{2^k} = H_{b_1} (x) ... (x) H_{b_m} (Sylvester ordering), so viewing the axis as ``(b_1, ..., b_m)`` and
    applying each small block along its own sub-axis gives the full transform in m GEMM passes.
    """
    before, n, after = x3.shape
    log2_sizes = _block_log2_sizes(n.bit_length() - 1)
    inner = n
    for log2_b in log2_sizes:
        b = 1 << log2_b
        inner //= b
        block = _normalised_hadamard(b, x3.device, x3.dtype)
        x3 = _apply_matrix(block, x3.reshape(before * (n // (inner * b)), b, inner * after))
    return x3.reshape(before, n, after)


class _AxisTransform:
    """An orthogonal transform along one axis; subclasses implement ``apply``/``apply_transpose`` on (P, n, R)."""

    size: int

    def apply(self, x3: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_transpose(self, x3: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError


class _DenseAxis(_AxisTransform):
    def __init__(self, matrix: torch.Tensor):
        self.size = matrix.shape[0]
        self.matrix = matrix

    def apply(self, x3: torch.Tensor) -> torch.Tensor:
        return _apply_matrix(self.matrix.to(x3), x3)

    def apply_transpose(self, x3: torch.Tensor) -> torch.Tensor:
        return _apply_matrix(self.matrix.to(x3).T, x3)

    @property
    def nbytes(self) -> int:
        return self.matrix.numel() * self.matrix.element_size()


class _HadamardAxis(_AxisTransform):
    """Signed Hadamard transforms on power-of-two windows: one window for n = 2^k, else head, tail, head."""

    def __init__(self, size: int, signs: list[torch.Tensor]):
        self.size = size
        width = 1 << (size.bit_length() - 1)
        starts = [0] if width == size else [0, size - width, 0]
        self.windows = list(zip(starts, signs))
        self.width = width

    @staticmethod
    def signs_needed(size: int) -> list[int]:
        width = 1 << (size.bit_length() - 1)
        return [width] if width == size else [width] * 3

    def _window(self, x3: torch.Tensor, start: int, transformed: torch.Tensor) -> torch.Tensor:
        if transformed.shape[1] == x3.shape[1]:
            return transformed
        return torch.cat([x3[:, :start], transformed, x3[:, start + self.width:]], dim=1)

    def apply(self, x3: torch.Tensor) -> torch.Tensor:
        for start, signs in self.windows:
            segment = x3[:, start:start + self.width] * signs.to(x3).view(1, -1, 1)
            x3 = self._window(x3, start, walsh_hadamard(segment))
        return x3

    def apply_transpose(self, x3: torch.Tensor) -> torch.Tensor:
        for start, signs in reversed(self.windows):
            segment = walsh_hadamard(x3[:, start:start + self.width].contiguous())
            x3 = self._window(x3, start, segment.mul_(signs.to(x3).view(1, -1, 1)))
        return x3

    @property
    def nbytes(self) -> int:
        return sum(signs.numel() * signs.element_size() for _, signs in self.windows)


def matrix_view(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape a parameter is rotated in: ``()`` for scalars, ``(n,)`` for vectors, else (dim 0, the rest)."""
    shape = tuple(shape)
    if len(shape) <= 1:
        return shape
    return (shape[0], math.prod(shape[1:]))


class Rotation:
    """A fixed orthogonal transform Q for one parameter shape (see the module docstring for the construction)."""

    def __init__(self, shape: torch.Size, axes: dict[int, _AxisTransform]):
        self.shape = torch.Size(shape)
        self.view = matrix_view(self.shape)
        self.axes = axes

    def _transform(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        if x.shape != self.shape:
            raise ValueError(f"rotation built for shape {tuple(self.shape)} got a tensor of shape {tuple(x.shape)}")
        y = x.reshape(self.view)
        for axis, transform in self.axes.items():
            before, after = math.prod(self.view[:axis]), math.prod(self.view[axis + 1:])
            y3 = y.reshape(before, transform.size, after)
            y3 = transform.apply_transpose(y3) if transpose else transform.apply(y3)
            y = y3.reshape(self.view)
        return y.reshape(self.shape) if self.axes else y.reshape(self.shape).clone()

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``Q x`` (a new tensor; for matrices ``Q_out @ x @ Q_in^T``)."""
        return self._transform(x, transpose=False)

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        """``Q^T x``, the inverse of :meth:`rotate`."""
        return self._transform(x, transpose=True)

    @property
    def nbytes(self) -> int:
        """Bytes held by this rotation (dense matrices and sign vectors; shared Hadamard blocks not counted)."""
        return sum(transform.nbytes for transform in self.axes.values())


def make_rotation(
    shape: Iterable[int],
    kind: str = "dense",
    seed: int = 0,
    key: str = "",
    max_dense_dim: int = DEFAULT_MAX_DENSE_DIM,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Rotation:
    """The rotation OrthoAdam uses for a parameter of ``shape`` named ``key`` (deterministic, see module doc).

    ``dtype``/``device`` only choose where the factors are stored; they are always sampled in float64 on the CPU,
    so the same (seed, key, shape, kind, max_dense_dim) gives the same Q everywhere.
    """
    _check_kind(kind)
    shape = torch.Size(shape)
    view = matrix_view(shape)
    axes: dict[int, _AxisTransform] = {}
    for axis, size in enumerate(view):
        if size <= 1:
            continue
        transform_kind = axis_kind(kind, size, max_dense_dim)
        generator = _generator(seed, key, shape, axis, transform_kind)
        if transform_kind == "dense":
            axes[axis] = _DenseAxis(haar_orthogonal(size, generator).to(device=device, dtype=dtype))
        else:
            signs = [_random_signs(width, generator).to(device=device, dtype=dtype)
                     for width in _HadamardAxis.signs_needed(size)]
            axes[axis] = _HadamardAxis(size, signs)
    return Rotation(shape, axes)


def rotation_nbytes(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    kind: str = "dense",
    max_dense_dim: int = DEFAULT_MAX_DENSE_DIM,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Memory (bytes) the rotations of these parameters take, without building dense matrices."""
    _check_kind(kind)
    element = torch.empty((), dtype=dtype).element_size()
    total = 0
    for _, parameter in named_parameters:
        for size in matrix_view(parameter.shape):
            if size <= 1:
                continue
            if axis_kind(kind, size, max_dense_dim) == "dense":
                total += size * size * element
            else:
                total += sum(_HadamardAxis.signs_needed(size)) * element
    return total
