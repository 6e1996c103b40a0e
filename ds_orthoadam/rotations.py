"""Fixed random orthogonal transforms ("rotations") for OrthoAdam, one per parameter.

OrthoAdam runs Adam in a rotated frame phi = Q theta. A dense Q on a flattened weight is impossible (a 512x512
weight would need a 262144x262144 matrix), so Q is a Kronecker product of one orthogonal transform per axis:

* the parameter is viewed as a matrix ``(shape[0], prod(shape[1:]))`` (trailing dims flattened: dim 0 is the output
  of ``nn.Linear``/``nn.Conv*``/``nn.Embedding`` rows) or as a vector when 1-D; 0-D parameters and axes of length 1
  are left unrotated (a 1x1 orthogonal matrix is +-1, a signed permutation, to which Adam is equivariant);
* a matrix G is rotated as ``Q_out @ G @ Q_in^T`` (every coordinate mixes with every other), a vector as ``Q g``.

Axis transforms:

* ``"dense"``: a Haar-random orthogonal matrix (QR of a Gaussian with the sign fix); n^2 memory and n^2 work per
  column.
* ``"hadamard"``: a randomised Hadamard transform ``Q = (O_m (x) O_b (x) H_{2^a/b}) D`` for ``n = 2^a m`` with m
  odd: D are random signs, H the orthonormal Walsh-Hadamard matrix (Sylvester order), O_b a Haar block of the first
  power-of-two factor (b <= 16; without it a one-hot gradient would become a flat vector, on which Adam's
  normalisation acts like on the one-hot, i.e. OrthoAdam would take Adam's step) and O_m a Kronecker product of
  odd blocks (prime factors grouped up to 32: 32000 = 25 * 5 * 2^8, 1376 = 43 * 2^5). An odd block of size k is
  three signed Hadamard transforms of width w = 2^floor(log2 k) on its coordinates [0, w), [k-w, k), [0, w)
  (:func:`odd_windows_block`): the windows overlap, so it mixes fully, at 3 log2(w) w / k additions per element
  where a Haar block costs k multiply-adds (rotation scheme version 2; version 1 used Haar odd blocks).
  Every output coordinate depends on every input coordinate; cost O(n log n) for the power-of-two part, O(n)
  memory (signs plus blocks of bounded size).
  Lengths with a prime factor above 256 (e.g. 50257) use overlapping power-of-two windows instead:
  with w = 2^floor(log2 n) > n/2, signed Hadamard transforms on ``[0, w)``, then ``[n-w, n)``, then, after a random
  permutation of the axis, on ``[0, w)`` again (each pass orthogonal; overlap + permutation make it mix fully).

Long axes, by length n (:func:`axis_kind`):

* ``n > max_rotated_dim`` (default 16384: the vocabulary axis of the embeddings and the output head, 32000, and no
  other axis of the model zoo; the widest, the 1.4B models' MLP axes, are 5461 and 8192): left unrotated, under
  either kind. The parameter is rotated along its other axis only, e.g. every embedding row by the same hidden-axis Q.
  Why by default: the outlier features the paper removes live on the hidden axis, which stays rotated, while
  Adam's per-coordinate normalisation along the vocabulary axis is per-token normalisation, which is what lets Adam
  train rare tokens' rows as fast as frequent ones (Kunstner et al., NeurIPS 2024, arXiv 2402.19449: heavy-tailed
  class imbalance is why Adam beats gradient descent on language models); mixing the vocabulary axis would let the
  frequent tokens' gradients set every row's scale. It is also the cheapest choice: the vocabulary axis is the most
  expensive one to rotate. ``max_rotated_dim=None`` rotates every axis (what runs before this option did; their
  checkpoints and state dicts resume that way). The same idea as SOAP's ``max_precond_dim``.
* ``max_dense_dim < n <= max_rotated_dim`` (``max_dense_dim`` default 4096): the ``long_axis`` transform,
  ``"hadamard"`` (default: the dense kind's Haar matrix would take n^2 memory and n multiply-adds per element) or
  ``"identity"``. Under the hadamard kind this only matters for ``"identity"``.
* otherwise the kind's own transform.

A parameter whose every axis is left unrotated is not rotated at all.

All Kronecker factors of a parameter are applied with one GEMM each by cycling through the "digits" of the
flattened index: ``x <- F @ x.view(-1, f).T`` transforms the last digit with F and moves it to the front, so after
all factors the original order is restored (no transposes or window copies needed); ``unrotate`` does the same with
the transposed factors. On the CPU, rotations without windows or wide dense blocks run instead in a compiled kernel
that computes the same Q in cache-sized tiles (:mod:`ds_orthoadam.kron_cpu`).

Mixing figure (:func:`axis_mixing`, printed per axis length in the training log): for an axis transform Q of length
n, ``n * mean_j sum_i Q_ij^4 = sum_ij Q_ij^4``: the (uncentred) kurtosis of the entries of Q's unit columns, i.e. of
the rotated image of a one-hot gradient, averaged over the columns. A Haar rotation gives 3n/(n+2), about 3 (Gaussian entries); a flat column
(a plain Hadamard transform) 1; no mixing (the identity) n. Above 3 the image of a one-hot stays concentrated on few
coordinates. It is multiplicative over Kronecker factors (the columns of A (x) B are products of columns), so for the
hadamard kind it is exact and cheap from the small factors: 2.4 at 512 (its Haar block), and with odd factors about
4.2 at 768, 6.6 at 1376, 18 at 2736, 10 at 5461 (means over random keys; a single key varies by 10-20%).

Reproducibility rule (what the DeepSpeed integration relies on): the rotation is a pure function of
``(seed, key, shape, kind, max_dense_dim, long_axis, max_rotated_dim, version)``. Random numbers come from a CPU
``torch.Generator`` (float64) seeded with a SHA-256 hash of ``(seed, key, shape, axis index, axis kind)`` -- never
Python's salted ``hash()`` -- so it is identical on every rank, device and restart. The construction itself (block
sizes, hashing) is versioned: new runs use ``ROTATION_VERSION``; OrthoAdam (and the DeepSpeed integration) record the
version in every checkpoint and resume with the recorded one (any of ``SUPPORTED_ROTATION_VERSIONS``), so a
checkpoint is never resumed with another Q. ``OrthoAdam`` uses ``key = parameter name`` when given
``model.named_parameters()`` and ``key = f"param{i}"`` otherwise, i being the parameter's position in the flattened
param groups (its id in ``optimizer.state_dict()``).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from ds_orthoadam import kron_cpu
from ds_orthoadam.errors import UserError

ROTATION_KINDS = ("dense", "hadamard")
LONG_AXIS_TRANSFORMS = ("hadamard", "identity")
DEFAULT_LONG_AXIS = "hadamard"
# Bump whenever a change here would give another Q for the same (seed, key, shape, kind, max_dense_dim, long_axis,
# max_rotated_dim).
# Earlier versions stay buildable, so that runs started with an earlier release resume in the frame they started in.
ROTATION_VERSION = 2
SUPPORTED_ROTATION_VERSIONS = (1, 2)  # 1: odd blocks of Hadamard axes were Haar blocks
DEFAULT_MAX_DENSE_DIM = 4096
# Axes longer than this stay unrotated (the vocabulary; see the module doc). None rotates every axis.
DEFAULT_MAX_ROTATED_DIM = 16384
# Power-of-two Hadamard transforms are applied as a Kronecker product of blocks of at most 2^4 (one GEMM each):
# on CPUs and GPUs small GEMMs beat log2(n) eager butterfly passes; the cost stays O(n log n).
HADAMARD_BLOCK_LOG2 = 4
# Odd parts of Hadamard axis lengths: odd blocks grouping prime factors up to ODD_BLOCK_TARGET (GEMM passes with
# small blocks are memory-bound, so fewer, moderately sized blocks are fastest); primes above MAX_ODD_PRIME use windows.
ODD_BLOCK_TARGET = 32
MAX_ODD_PRIME = 256


class RotationKindError(UserError, ValueError):
    """An unknown rotation kind was requested."""


def check_kind(kind: str) -> None:
    if kind not in ROTATION_KINDS:
        raise RotationKindError(
            f"unknown rotation kind {kind!r}: choose one of {', '.join(ROTATION_KINDS)} "
            "(signed permutations are deliberately not offered: Adam is equivariant to them)"
        )


class RotationVersionError(UserError, ValueError):
    """A rotation scheme version this release cannot build was requested (a checkpoint from a newer release)."""


def check_version(version: object) -> None:
    if version not in SUPPORTED_ROTATION_VERSIONS:
        raise RotationVersionError(
            f"rotation scheme version {version!r} is not one this ds_orthoadam builds "
            f"({', '.join(map(str, SUPPORTED_ROTATION_VERSIONS))}): resume with the release that wrote it")


class LongAxisError(UserError, ValueError):
    """An unknown long-axis transform was requested."""


def check_long_axis(long_axis: str) -> None:
    if long_axis not in LONG_AXIS_TRANSFORMS:
        raise LongAxisError(f"unknown long_axis transform {long_axis!r}: choose one of "
                            f"{', '.join(LONG_AXIS_TRANSFORMS)}")


class MaxRotatedDimError(UserError, ValueError):
    """``max_rotated_dim`` is neither None nor a positive integer."""


def check_max_rotated_dim(max_rotated_dim: object) -> None:
    if max_rotated_dim is not None and (not isinstance(max_rotated_dim, int) or isinstance(max_rotated_dim, bool)
                                        or max_rotated_dim < 1):
        raise MaxRotatedDimError(f"invalid max_rotated_dim={max_rotated_dim!r}: use an int >= 1 (longer axes stay "
                                 f"unrotated; default {DEFAULT_MAX_ROTATED_DIM}) or None (rotate every axis)")


def axis_kind(kind: str, size: int, max_dense_dim: int, long_axis: str = DEFAULT_LONG_AXIS,
              max_rotated_dim: int | None = DEFAULT_MAX_ROTATED_DIM) -> str:
    """The transform along an axis of ``size``: identity beyond ``max_rotated_dim``, else ``long_axis`` beyond
    ``max_dense_dim``, else the kind's own."""
    if max_rotated_dim is not None and size > max_rotated_dim:
        return "identity"
    return kind if size <= max_dense_dim else long_axis


def _generator(seed: int, key: str, shape: Sequence[int], axis: int, transform: str) -> torch.Generator:
    """A CPU generator whose seed is a stable hash of everything that identifies one axis transform."""
    text = f"ds_orthoadam|seed={seed}|key={key}|shape={tuple(shape)}|axis={axis}|kind={transform}"
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def haar_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-distributed n x n orthogonal matrix (float64): QR of a Gaussian, columns sign-fixed by diag(R)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).contiguous()


def _random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator).to(torch.float64).mul_(2).sub_(1)


def normalised_hadamard(size: int) -> torch.Tensor:
    """The symmetric orthonormal Sylvester-Hadamard matrix of a power-of-two ``size`` (float64)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(size)


def _hadamard_block_sizes(power_of_two: int) -> list[int]:
    """Split 2^a into as few, as equal as possible power-of-two Kronecker factors of at most 2^HADAMARD_BLOCK_LOG2."""
    log2_n = power_of_two.bit_length() - 1
    count = math.ceil(log2_n / HADAMARD_BLOCK_LOG2)
    base, extra = divmod(log2_n, max(count, 1))
    return [1 << (base + 1 if i < extra else base) for i in range(count)]


def _odd_block_sizes(odd: int) -> list[int] | None:
    """Group the prime factors of an odd length into blocks of at most ODD_BLOCK_TARGET (a larger prime is its own
    block); None if a prime factor exceeds MAX_ODD_PRIME."""
    primes, divisor = [], 3
    while odd > 1:
        while odd % divisor == 0:
            primes.append(divisor)
            odd //= divisor
        divisor += 2
        if divisor > MAX_ODD_PRIME and odd > 1:
            return None
    blocks: list[int] = []
    for prime in sorted(primes, reverse=True):
        if blocks and blocks[-1] * prime <= ODD_BLOCK_TARGET:
            blocks[-1] *= prime
        else:
            blocks.append(prime)
    return blocks


def _apply_along_axis(matrix: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """``matrix`` applied along ``axis`` of ``x`` (a new tensor of the same shape)."""
    return torch.movedim(torch.tensordot(matrix, x, dims=([1], [axis])), 0, axis).contiguous()


def _hadamard_along_axis(x: torch.Tensor, axis: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard transform along a power-of-two ``axis`` of ``x``, as Kronecker blocks of at
    most 2^HADAMARD_BLOCK_LOG2 (H_{2^a} = H_{2^b} kron H_{2^c} for b + c = a): O(n) memory and O(n log n) work, where
    the dense matrix of a window (up to 16384 wide below the default max_rotated_dim) takes n^2 of each."""
    shape = list(x.shape)
    blocks = _hadamard_block_sizes(shape[axis])
    y = x.reshape(shape[:axis] + blocks + shape[axis + 1:])
    for offset, block in enumerate(blocks):
        y = _apply_along_axis(_shared_hadamard(block, x.device, x.dtype), y, axis + offset)
    return y.reshape(shape)


@dataclass
class _Windows:
    """Overlapping signed power-of-two Hadamard windows for lengths with a large prime factor."""

    size: int
    signs: list[torch.Tensor]  # three sign vectors of the window width
    permutation: torch.Tensor  # applied before the third window

    @property
    def width(self) -> int:
        return self.signs[0].numel()

    def apply(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        starts = [0, self.size - self.width, 0]
        for index, (start, signs) in enumerate(zip(starts, self.signs)):
            if index == 2:
                x = x.index_select(axis, self.permutation)
            window = x.narrow(axis, start, self.width)
            shape = [1] * x.dim()
            shape[axis] = self.width
            mixed = _hadamard_along_axis(window * signs.to(x).view(shape), axis)
            x = x.clone() if index == 0 else x
            x.narrow(axis, start, self.width).copy_(mixed)
        return x

    def apply_transpose(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        starts = [0, self.size - self.width, 0]
        x = x.clone()
        for index in (2, 1, 0):
            shape = [1] * x.dim()
            shape[axis] = self.width
            window = x.narrow(axis, starts[index], self.width)
            mixed = _hadamard_along_axis(window, axis) * self.signs[index].to(x).view(shape)
            window.copy_(mixed)
            if index == 2:
                x = x.index_copy(axis, self.permutation, x)
        return x

    @property
    def nbytes(self) -> int:
        tensors = [*self.signs, self.permutation]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Axis:
    """Q_axis = kron(factors) @ diag(signs), the windows transform for awkward lengths, or (neither) the identity."""

    size: int
    factors: list[torch.Tensor] = field(default_factory=list)
    signs: torch.Tensor | None = None
    windows: _Windows | None = None
    shared_factor_ids: set[int] = field(default_factory=set)  # Hadamard blocks: not owned, not counted
    # Odd blocks (odd_windows_block): id of the factor -> its window signs (3 w), what the CPU kernel applies.
    window_signs: dict[int, torch.Tensor] = field(default_factory=dict)

    def is_hadamard(self, factor: torch.Tensor) -> bool:
        """Whether ``factor`` is one of the shared Sylvester-Hadamard blocks (else a block this axis owns)."""
        return id(factor) in self.shared_factor_ids

    def is_odd_windows(self, factor: torch.Tensor) -> bool:
        """Whether ``factor`` is an odd block (Hadamard windows; else, if not Hadamard, a Haar block)."""
        return id(factor) in self.window_signs

    @property
    def nbytes(self) -> int:
        owned = [f for f in self.factors if not self.is_hadamard(f)] + list(self.window_signs.values())
        owned += [self.signs] if self.signs is not None else []
        return sum(t.numel() * t.element_size() for t in owned) + (self.windows.nbytes if self.windows else 0)


Workspace = tuple[torch.Tensor, torch.Tensor]


class ScratchBuffers:
    """Workspaces for :meth:`Rotation.rotate`/:meth:`Rotation.unrotate`: two flat buffers per (device, dtype) as
    large as the largest tensor rotated so far, kept between steps -- on the CPU only.

    On the CPU every fresh parameter-sized tensor is page-faulted in anew, which costs more than a Kronecker factor's
    arithmetic (a third of a Hadamard rotation's time for llama-60m); accelerators' caching allocators hand freed
    blocks back at no cost, so there ``get`` returns None (rotations allocate as they go) and no memory is held.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], Workspace] = {}

    def get(self, numel: int, device: torch.device, dtype: torch.dtype) -> Workspace | None:
        if device.type != "cpu":
            return None
        buffers = self._buffers.get((device, dtype))
        if buffers is None or buffers[0].numel() < numel:
            buffers = self._buffers[(device, dtype)] = (torch.empty(numel, device=device, dtype=dtype),
                                                        torch.empty(numel, device=device, dtype=dtype))
        return buffers

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives in one of the buffers (and is therefore overwritten by the next rotation)."""
        storage = tensor.untyped_storage().data_ptr()
        return any(b.untyped_storage().data_ptr() == storage for buffers in self._buffers.values() for b in buffers)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for buffers in self._buffers.values() for b in buffers)


_SHARED_HADAMARD: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def _shared_hadamard(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Hadamard blocks are constants: one copy per (size, device, dtype) serves every rotation."""
    key = (size, str(device), dtype)
    if key not in _SHARED_HADAMARD:
        _SHARED_HADAMARD[key] = normalised_hadamard(size).to(device=device, dtype=dtype)
    return _SHARED_HADAMARD[key]


def matrix_view(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape a parameter is rotated in: ``()`` for scalars, ``(n,)`` for vectors, else (dim 0, the rest)."""
    shape = tuple(shape)
    return shape if len(shape) <= 1 else (shape[0], math.prod(shape[1:]))


class Rotation:
    """A fixed orthogonal transform Q for one parameter shape (see the module docstring for the construction)."""

    def __init__(self, shape: torch.Size, axes: list[_Axis]):
        self.shape = torch.Size(shape)
        self.axes = axes  # the axes of length > 1 of matrix_view(shape), in order (identity axes included)
        self._cpu_plans: dict[tuple[bool, torch.dtype], kron_cpu.KronPlan | None] = {}

    def _cpu_plan(self, x: torch.Tensor, transpose: bool) -> kron_cpu.KronPlan | None:
        """The compiled CPU kernel's plan for ``x`` (see :mod:`ds_orthoadam.kron_cpu`), or None where it does not
        apply: other devices or dtypes, window axes, dense factors wider than ``kron_cpu.MAX_FACTOR``, no compiler."""
        if x.device.type != "cpu" or not kron_cpu.supports(x.dtype) or not self.axes:
            return None
        key = (transpose, x.dtype)
        if key not in self._cpu_plans:
            usable = all(a.windows is None and all(f.shape[0] <= kron_cpu.MAX_FACTOR or a.is_odd_windows(f)
                                                     for f in a.factors)
                         for a in self.axes)
            plan = None
            if usable and kron_cpu.library() is not None:
                digits = [self._axis_digits(a, transpose, x.dtype) for a in self.axes]
                plan = kron_cpu.KronPlan(digits[0] if len(digits) == 2 else None, digits[-1], signs_last=transpose,
                                         dtype=x.dtype)
            self._cpu_plans[key] = plan
        return self._cpu_plans[key]

    @staticmethod
    def _axis_digits(axis: _Axis, transpose: bool, dtype: torch.dtype) -> kron_cpu.AxisDigits:
        def cpu(t: torch.Tensor) -> torch.Tensor:
            return t.to(device="cpu", dtype=dtype).contiguous()

        if not axis.factors:
            return kron_cpu.AxisDigits((axis.size,), (kron_cpu.IDENTITY,), (None,), None)
        def digit(factor: torch.Tensor) -> tuple[int, torch.Tensor | None]:
            if axis.is_hadamard(factor):
                return kron_cpu.HADAMARD, None
            if axis.is_odd_windows(factor):  # the kernel runs the windows (backwards when transposed)
                return kron_cpu.WINDOWS, cpu(axis.window_signs[id(factor)])
            return kron_cpu.DENSE, cpu(factor.T if transpose else factor)

        kinds, factors = zip(*(digit(f) for f in axis.factors))
        return kron_cpu.AxisDigits(sizes=tuple(f.shape[0] for f in axis.factors), kinds=kinds, factors=factors,
                                   signs=None if axis.signs is None else cpu(axis.signs))

    def _apply_cpu_plan(self, plan: kron_cpu.KronPlan, x: torch.Tensor, workspace: Workspace | None) -> torch.Tensor:
        source = x.contiguous()
        out = self.free_buffer(source, workspace)
        return plan(source, torch.empty_like(source) if out is None else out).view(self.shape)

    def _kronecker(self, y: torch.Tensor, transpose: bool, workspace: Workspace | None) -> torch.Tensor:
        """Apply kron(all factors) (or its transpose, kron of the transposed factors) by cycling index digits.

        ``F @ y.view(-1, f).T`` transforms the last digit with F and moves it to the front; after one step per
        digit (last to first) the original order is back. A window or identity axis has no factor: its digit is
        only cycled.
        """
        digits = []
        for axis in self.axes:
            digits += [(f.shape[0], f.T if transpose else f) for f in axis.factors] or [(axis.size, None)]
        for size, factor in reversed(digits):
            digit_last = y.reshape(-1, size).T
            out = self.free_buffer(y, workspace)
            out = None if out is None else out.view(size, -1)
            if factor is None:
                y = digit_last.contiguous() if out is None else out.copy_(digit_last)
            else:
                y = torch.matmul(factor.to(y), digit_last, out=out)
        return y

    def _signs(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """Multiply by every axis' sign vector: into ``out`` (``x`` itself: in place; None: a new tensor)."""
        view = [axis.size for axis in self.axes]
        signed = x.reshape(view)
        for position, axis in enumerate(self.axes):
            if axis.signs is None:
                continue
            shape = [1] * len(view)
            shape[position] = axis.size
            signs = axis.signs.to(x).view(shape)
            if signed.data_ptr() == x.data_ptr() and out is not x:
                signed = torch.mul(signed, signs, out=None if out is None else out.view(view))
            else:
                signed.mul_(signs)
        return signed

    def _windows(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        view = [axis.size for axis in self.axes]
        for position, axis in enumerate(self.axes):
            if axis.windows is not None:
                windows = axis.windows
                x = (windows.apply_transpose if transpose else windows.apply)(x.reshape(view), position)
        return x

    def _check(self, x: torch.Tensor) -> None:
        if x.shape != self.shape:
            raise ValueError(f"rotation built for shape {tuple(self.shape)} got a tensor of shape {tuple(x.shape)}")

    @staticmethod
    def free_buffer(current: torch.Tensor, workspace: Workspace | None) -> torch.Tensor | None:
        """The workspace buffer (flat, sized like ``current``) that does not hold ``current``; None: allocate."""
        if workspace is None:
            return None
        first, second = (buffer[:current.numel()] for buffer in workspace)
        return second if current.data_ptr() == first.data_ptr() else first

    def rotate(self, x: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        """``Q x`` (for matrices ``Q_out @ x @ Q_in^T``); x is never modified.

        Without ``workspace`` the result is a new tensor. With a workspace (two flat buffers of at least x.numel()
        elements, x's dtype and device) no memory is allocated and the result is a view into one of the buffers,
        valid until the workspace is reused; x may itself live in a workspace buffer.
        """
        self._check(x)
        if not self.axes:  # a scalar or an empty tensor: Q is the identity
            return x.clone()
        plan = self._cpu_plan(x, transpose=False)
        if plan is not None:
            return self._apply_cpu_plan(plan, x, workspace)
        y = self._windows(self._signs(x, self.free_buffer(x, workspace)), transpose=False)
        y = self._kronecker(y, transpose=False, workspace=workspace)
        return y.reshape(self.shape) if y.data_ptr() != x.data_ptr() else x.clone()

    def unrotate(self, x: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        """``Q^T x``, the inverse of :meth:`rotate` (same contract for ``workspace``)."""
        self._check(x)
        if not self.axes:
            return x.clone()
        plan = self._cpu_plan(x, transpose=True)
        if plan is not None:
            return self._apply_cpu_plan(plan, x, workspace)
        y = self._windows(self._kronecker(x, transpose=True, workspace=workspace), transpose=True)
        # Signs in place on an intermediate result; into a free buffer (or a new tensor) if y is still x.
        y = self._signs(y, y if y.data_ptr() != x.data_ptr() else self.free_buffer(x, workspace))
        return y.reshape(self.shape) if y.data_ptr() != x.data_ptr() else x.clone()

    @property
    def nbytes(self) -> int:
        """Bytes held by this rotation (dense blocks, signs, permutations; shared Hadamard blocks not counted)."""
        return sum(axis.nbytes for axis in self.axes)


def window_width(size: int) -> int:
    """The largest power of two below an odd ``size`` (more than half of it, so that windows at both ends overlap)."""
    return 1 << ((size - 1).bit_length() - 1)


def odd_windows_block(size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The transform of an odd block: ``W3 W2 W1``, each ``W`` a signed Hadamard transform of width
    w = window_width(size) on the block's coordinates ``[0, w)``, ``[size-w, size)``, ``[0, w)`` in turn.

    Returns the three sign vectors (3 x w, scaled by 1/sqrt(w): the unnormalised +-1 Hadamard matrix then gives an
    orthogonal window) and the product as a dense size x size matrix (float64) for the GEMM path. Every output
    depends on every input (the windows overlap), and a column is not flat (coordinates outside the middle overlap
    pass through fewer windows), so Adam's per-coordinate normalisation cannot undo it. It costs 3 w log2(w) / size
    additions per element instead of a Haar block's size multiply-adds.
    """
    width = window_width(size)
    signs = torch.stack([_random_signs(width, generator) for _ in range(3)]) / math.sqrt(width)
    hadamard = normalised_hadamard(width) * math.sqrt(width)
    matrix = torch.eye(size, dtype=torch.float64)
    for start, window_signs in zip((0, size - width, 0), signs):
        matrix[start:start + width] = (hadamard * window_signs) @ matrix[start:start + width]
    return signs, matrix


def _hadamard_axis(size: int, generator: torch.Generator, device, dtype: torch.dtype, version: int) -> _Axis:
    power_of_two = size & -size
    odd_blocks = _odd_block_sizes(size // power_of_two)
    if odd_blocks is None:
        width = 1 << (size.bit_length() - 1)
        signs = [_random_signs(width, generator).to(device=device, dtype=dtype) for _ in range(3)]
        permutation = torch.randperm(size, generator=generator).to(device)
        return _Axis(size, windows=_Windows(size, signs, permutation))
    odd, window_signs = [], {}
    for block in odd_blocks:
        if version == 1:
            odd.append(haar_orthogonal(block, generator).to(device=device, dtype=dtype))
            continue
        block_signs, matrix = odd_windows_block(block, generator)
        odd.append(matrix.to(device=device, dtype=dtype))
        window_signs[id(odd[-1])] = block_signs.reshape(-1).to(device=device, dtype=dtype)
    hadamard_blocks = _hadamard_block_sizes(power_of_two)
    # The first power-of-two block is Haar: H D alone maps a one-hot gradient to a flat vector, which Adam's
    # per-coordinate normalisation treats like the one-hot itself (OrthoAdam would then take Adam's step).
    haar = [haar_orthogonal(b, generator).to(device=device, dtype=dtype) for b in hadamard_blocks[:1]]
    hadamard = [_shared_hadamard(b, device, dtype) for b in hadamard_blocks[1:]]
    signs = _random_signs(size, generator).to(device=device, dtype=dtype)
    return _Axis(size, factors=odd + haar + hadamard, signs=signs, shared_factor_ids={id(h) for h in hadamard},
                 window_signs=window_signs)


def make_rotation(
    shape: Iterable[int],
    kind: str = "dense",
    seed: int = 0,
    key: str = "",
    max_dense_dim: int = DEFAULT_MAX_DENSE_DIM,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    long_axis: str = DEFAULT_LONG_AXIS,
    version: int = ROTATION_VERSION,
    max_rotated_dim: int | None = DEFAULT_MAX_ROTATED_DIM,
) -> Rotation:
    """The rotation OrthoAdam uses for a parameter of ``shape`` named ``key`` (deterministic, see module doc).

    ``dtype``/``device`` only choose where the factors are stored; they are always sampled in float64 on the CPU,
    so the same (seed, key, shape, kind, max_dense_dim, long_axis, max_rotated_dim, version) gives the same Q
    everywhere.
    ``rotate``/``unrotate`` accept tensors of any floating dtype and device (factors are cast on the fly if they
    differ). ``version`` selects an earlier rotation scheme (see SUPPORTED_ROTATION_VERSIONS) to resume old runs.
    """
    check_kind(kind)
    check_long_axis(long_axis)
    check_max_rotated_dim(max_rotated_dim)
    check_version(version)
    shape = torch.Size(shape)
    axes = []
    if shape.numel() == 0:  # nothing to rotate (an axis of length 0): the identity, like a scalar
        return Rotation(shape, axes)
    for axis, size in enumerate(matrix_view(shape)):
        if size <= 1:
            continue
        transform = axis_kind(kind, size, max_dense_dim, long_axis, max_rotated_dim)
        if transform == "identity":
            axes.append(_Axis(size))
            continue
        generator = _generator(seed, key, shape, axis, transform)
        if transform == "dense":
            axes.append(_Axis(size, factors=[haar_orthogonal(size, generator).to(device=device, dtype=dtype)]))
        else:
            axes.append(_hadamard_axis(size, generator, device, dtype, version))
    return Rotation(shape, axes)


# Columns sampled to estimate the mixing figure of a window axis (no Kronecker factors to compute it from exactly).
MIXING_SAMPLED_COLUMNS = 64


def axis_mixing(axis: _Axis, sampled_columns: int = MIXING_SAMPLED_COLUMNS) -> float:
    """The mixing figure ``n * mean_j sum_i Q_ij^4`` of one axis transform (see the module docstring).

    Exact for Kronecker axes (the product of the factors' ``sum F^4``; the signs do not change it) and the identity
    (n); for window axes (a prime factor above MAX_ODD_PRIME) estimated from ``sampled_columns`` columns, chosen by a
    fixed generator, pushed through the transform (exact once ``sampled_columns >= n``).
    """
    if axis.windows is None and not axis.factors:
        return float(axis.size)  # the identity
    if axis.windows is None:
        return math.prod(float(factor.double().pow(4).sum()) for factor in axis.factors)
    device = axis.windows.permutation.device
    columns = torch.randperm(axis.size, generator=torch.Generator().manual_seed(0))[:sampled_columns].to(device)
    one_hot = torch.zeros(axis.size, columns.numel(), dtype=torch.float64, device=device)
    one_hot[columns, torch.arange(columns.numel(), device=device)] = 1.0
    images = axis.windows.apply(one_hot, 0)
    return axis.size * float(images.pow(4).sum(dim=0).mean())


def mixing_by_axis_length(rotations: Iterable[Rotation]) -> dict[int, float]:
    """The mean :func:`axis_mixing` of every rotated (non-identity) axis, by axis length, in increasing length."""
    figures: dict[int, list[float]] = {}
    for rotation in rotations:
        for axis in rotation.axes:
            if axis.factors or axis.windows is not None:
                figures.setdefault(axis.size, []).append(axis_mixing(axis))
    return {size: sum(values) / len(values) for size, values in sorted(figures.items())}


def rotation_nbytes(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    kind: str = "dense",
    seed: int = 0,
    max_dense_dim: int = DEFAULT_MAX_DENSE_DIM,
    dtype: torch.dtype = torch.float32,
    long_axis: str = DEFAULT_LONG_AXIS,
    max_rotated_dim: int | None = DEFAULT_MAX_ROTATED_DIM,
) -> int:
    """Memory (bytes) the rotations of these parameters take (builds each rotation once, on the CPU)."""
    return sum(make_rotation(p.shape, kind, seed, name, max_dense_dim, dtype=dtype, long_axis=long_axis,
                             max_rotated_dim=max_rotated_dim).nbytes
               for name, p in named_parameters)
