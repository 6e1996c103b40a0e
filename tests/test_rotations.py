"""Rotations: orthogonal, really mixing, Haar-distributed, reproducible from (seed, key, shape, kind)."""
import functools
import math
import os
import subprocess
import sys

import pytest
import scipy.linalg
import torch

from ds_orthoadam.rotations import (
    LongAxisError,
    MaxRotatedDimError,
    RotationKindError,
    RotationVersionError,
    ScratchBuffers,
    _hadamard_along_axis,
    axis_mixing,
    haar_orthogonal,
    make_rotation,
    mixing_by_axis_length,
    normalised_hadamard,
    odd_windows_block,
    rotation_nbytes,
)
from ds_orthoadam.zero_orthoadam import RotatedFrame, RotationSpec

SHAPES = [(), (1,), (2,), (7,), (16,), (12,), (5, 6), (8, 4), (1, 9), (3, 4, 5), (2, 3, 1, 2), (263,), (2, 263)]
# "dense-fallback": dense kind with a tiny max_dense_dim, so long axes take the structured transform;
# "*-identity": long axes (beyond a tiny max_dense_dim) are left unrotated.
KINDS = [("dense", 4096), ("hadamard", 4096), ("dense-fallback", 4), ("dense-identity", 4), ("hadamard-identity", 4)]


def full_matrix(rotation, shape) -> torch.Tensor:
    """The matrix of ``rotation`` acting on flattened tensors of ``shape``, built column by column."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64)
    return torch.stack([rotation.rotate(basis[i].reshape(shape)).reshape(-1) for i in range(n)], dim=1)


def build(shape, kind, max_dense_dim, key="layer.weight", seed=0):
    long_axis = "identity" if kind.endswith("-identity") else "hadamard"
    kind = kind.split("-")[0]
    return make_rotation(shape, kind, seed=seed, key=key, max_dense_dim=max_dense_dim, dtype=torch.float64,
                         long_axis=long_axis)


@pytest.mark.parametrize("kind,max_dense_dim", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_rotation_is_orthogonal_and_unrotate_inverts_it(shape, kind, max_dense_dim):
    rotation = build(shape, kind, max_dense_dim)
    q = full_matrix(rotation, shape)
    identity = torch.eye(q.shape[0], dtype=torch.float64)
    torch.testing.assert_close(q.T @ q, identity, rtol=0, atol=1e-6)
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(rotation.unrotate(x).reshape(-1), q.T @ x.reshape(-1), rtol=0, atol=1e-10)
    torch.testing.assert_close(rotation.unrotate(rotation.rotate(x)), x, rtol=0, atol=1e-10)


MIXING_SHAPES = [(12,), (8, 4), (48,), (24, 10), (6, 20), (100,), (263,), (2, 263)]


@pytest.mark.parametrize("shape", MIXING_SHAPES)
def test_hadamard_rotation_mixes_every_coordinate(shape):
    """No coordinate keeps most of its energy and each spreads over most outputs (unlike a signed permutation)."""
    q = full_matrix(build(shape, "hadamard", 4096), shape)
    largest_share = (q**2).max(dim=0).values
    assert largest_share.max() <= 0.75, largest_share.max()
    reached = (q.abs() > 1e-9).sum(dim=0)
    assert reached.min() >= q.shape[0] // 2, reached.min()


@pytest.mark.parametrize("shape", MIXING_SHAPES)
def test_dense_rotation_connects_every_pair_of_coordinates(shape):
    q = full_matrix(build(shape, "dense", 4096), shape)
    assert (q.abs() > 1e-9).all()


@pytest.mark.parametrize("shape,kind", [((6, 10), "dense"), ((64, 12), "hadamard"), ((3, 2, 5), "hadamard")])
def test_rotation_is_the_kronecker_product_of_its_axis_factors(shape, kind):
    """The digit-cycle application equals torch.kron of all factors times the diagonal of all signs."""
    rotation = make_rotation(shape, kind, key="w", dtype=torch.float64)
    factors = [f for axis in rotation.axes for f in axis.factors]
    signs = [axis.signs if axis.signs is not None else torch.ones(axis.size, dtype=torch.float64)
             for axis in rotation.axes]
    expected = functools.reduce(torch.kron, factors) @ torch.diag(functools.reduce(torch.kron, signs))
    torch.testing.assert_close(full_matrix(rotation, shape), expected, rtol=0, atol=1e-12)


# Two ways to leave axes over 10 unrotated, each with the rotation that differs only in rotating them.
UNROTATED_LONG_AXES = {
    "long_axis": ({"max_dense_dim": 10, "long_axis": "identity"}, {"max_dense_dim": 10}),
    "max_rotated_dim": ({"max_rotated_dim": 10}, {"max_rotated_dim": None}),
}


@pytest.mark.parametrize("setting", sorted(UNROTATED_LONG_AXES))
@pytest.mark.parametrize("kind", ["dense", "hadamard"])
@pytest.mark.parametrize("shape,long_axes", [((40, 6), (0,)), ((6, 40), (1,)), ((40, 3, 4), (0, 1)), ((50,), (0,))])
def test_unrotated_long_axes_leave_that_axis_unmixed_and_keep_the_other_axis_transform(kind, shape, long_axes,
                                                                                      setting):
    """With long_axis="identity" (axes over max_dense_dim) or with max_rotated_dim, Q = kron over axes of (I for a
    long axis, else the axis transform the rotation with long axes rotated uses for that axis: the same draw)."""
    view = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else shape
    unrotated, rotated = UNROTATED_LONG_AXES[setting]
    identity = make_rotation(shape, kind, key="layer.weight", dtype=torch.float64, **unrotated)
    default = make_rotation(shape, kind, key="layer.weight", dtype=torch.float64, **rotated)
    assert len(default.axes) == len(view)
    blocks = []
    for position, (size, axis) in enumerate(zip(view, default.axes)):
        if position in long_axes:
            blocks.append(torch.eye(size, dtype=torch.float64))
        else:
            signs = axis.signs if axis.signs is not None else torch.ones(size, dtype=torch.float64)
            blocks.append(functools.reduce(torch.kron, axis.factors) @ torch.diag(signs))
    torch.testing.assert_close(full_matrix(identity, shape), functools.reduce(torch.kron, blocks), rtol=0, atol=1e-12)


@pytest.mark.parametrize("value", [0, -1, 2.5, "none", False])
def test_an_invalid_max_rotated_dim_fails_clearly(value):
    with pytest.raises(MaxRotatedDimError, match=rf"invalid max_rotated_dim={value!r}: use an int >= 1"):
        make_rotation((8, 5000), "hadamard", max_rotated_dim=value)


def test_unknown_long_axis_transform_fails_clearly():
    with pytest.raises(LongAxisError, match="unknown long_axis transform 'drop': choose one of hadamard, identity"):
        make_rotation((8, 5000), "hadamard", long_axis="drop")


@pytest.mark.parametrize("n", [2, 4, 64, 256])
def test_hadamard_blocks_match_scipy(n):
    expected = torch.from_numpy(scipy.linalg.hadamard(n)).double() / math.sqrt(n)
    torch.testing.assert_close(normalised_hadamard(n), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("n,shape,axis", [(256, (256,), 0), (512, (3, 512, 2), 1), (2048, (2, 2048), 1)])
def test_window_hadamard_transform_in_kronecker_blocks_matches_scipy(n, shape, axis):
    """Windows (lengths with a prime factor > 256) apply H_w as Kronecker blocks of at most 16 instead of a dense
    w x w matrix (1.2 GiB and 3.5 s per rotation for a 12289-long axis)."""
    x = torch.randn(shape, dtype=torch.float64)
    dense = torch.from_numpy(scipy.linalg.hadamard(n)).double() / math.sqrt(n)
    expected = torch.movedim(torch.tensordot(dense, x, dims=([1], [axis])), 0, axis)
    torch.testing.assert_close(_hadamard_along_axis(x, axis), expected, rtol=0, atol=1e-12)


def test_hadamard_rotation_does_not_flatten_a_one_hot_vector():
    """A bare H D maps e_j to a flat vector (|entries| all 1/sqrt(n)): Adam would then treat it like e_j itself."""
    one_hot = torch.zeros(512, dtype=torch.float64)
    one_hot[7] = 1.0
    magnitudes = make_rotation((512,), "hadamard", key="b", dtype=torch.float64).rotate(one_hot).abs()
    assert magnitudes.std() > 0.2 * magnitudes.mean()


@pytest.mark.parametrize("size", [3, 5, 25, 43, 125, 255])
def test_odd_blocks_are_three_overlapping_signed_hadamard_windows(size):
    """The odd block W3 W2 W1, rebuilt from scipy's Hadamard matrix and the returned signs; it mixes every coordinate
    and leaves no column flat (a flat column is what lets Adam's normalisation undo a rotation)."""
    signs, matrix = odd_windows_block(size, torch.Generator().manual_seed(size))
    width = 1 << (size.bit_length() - 1)
    assert signs.shape == (3, width)
    torch.testing.assert_close(signs.abs(), torch.full_like(signs, width**-0.5), rtol=0, atol=1e-15)
    expected = torch.eye(size, dtype=torch.float64)
    for start, window_signs in zip((0, size - width, 0), signs):
        window = torch.eye(size, dtype=torch.float64)
        window[start:start + width, start:start + width] = (
            torch.from_numpy(scipy.linalg.hadamard(width)).double() @ torch.diag(window_signs))
        expected = window @ expected
    torch.testing.assert_close(matrix, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(matrix.T @ matrix, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (matrix.abs() > 1e-9).all()
    magnitudes = matrix.abs()
    assert (magnitudes.std(dim=0) > 0.05 * magnitudes.mean(dim=0)).all()


# Version 1's Q applied to 1, 2, ..., n (key "layer.weight", seed 0, float64), computed by the last version-1 code
# (commit 6afb910) on its GEMM path: runs started with it must resume in this frame.
VERSION_1_ROTATED_ARANGE = {
    (12,): [-3.844123916774456, 14.50790097553315, -7.359742869115262, 0.909362440847498, -3.830539910308793,
            -0.683895367256963, -17.463241643732584, 3.981382919639966, 0.290373029774182, -5.739642197111135,
            -0.44450459726177, -0.753926074627336],
    (6, 5): [17.005425191528474, -5.710754509216052, -24.85432408661718, 11.847253279156426, -15.025999361799611,
             15.0875082408876, -5.884628622282206, -22.173676292375315, 10.635316810801132, -14.818678469742796,
             -21.383138087015013, 7.969938185746296, 31.370744982155262, -15.016937085948355, 20.32897278108525,
             -17.435984220675316, 8.038087985012329, 25.8104773960811, -12.478723236501, 19.37552657851633,
             24.418637526299484, -10.25563385495472, -35.9969195880585, 17.324018658971315, -25.313800410862928,
             9.921198967975638, -2.62932833998684, -14.395168583643995, 6.805170881499543, -7.489127505353756],
}


@pytest.mark.parametrize("shape", sorted(VERSION_1_ROTATED_ARANGE))
def test_version_1_rotations_are_the_previous_release_s(shape):
    rotation = make_rotation(shape, "hadamard", seed=0, key="layer.weight", dtype=torch.float64, version=1)
    x = torch.arange(1, math.prod(shape) + 1, dtype=torch.float64).reshape(shape)
    expected = torch.tensor(VERSION_1_ROTATED_ARANGE[shape], dtype=torch.float64)
    torch.testing.assert_close(rotation.rotate(x).reshape(-1), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(rotation.unrotate(rotation.rotate(x)), x, rtol=0, atol=1e-12)


def test_an_unknown_rotation_scheme_version_fails_clearly():
    with pytest.raises(RotationVersionError, match=r"rotation scheme version 3 is not one this ds_orthoadam builds"):
        make_rotation((6, 5), "hadamard", version=3)


def test_dense_axes_are_haar_distributed():
    """Haar moments: E[Q_ij] = 0 and E[Q_ij^2] = 1/n (plain QR without the sign fix has E[Q_ii] near +-0.5)."""
    generator = torch.Generator().manual_seed(0)
    samples = torch.stack([haar_orthogonal(3, generator) for _ in range(3000)])
    assert samples.mean(dim=0).abs().max() < 0.05
    torch.testing.assert_close((samples**2).mean(dim=0), torch.full((3, 3), 1 / 3, dtype=torch.float64),
                               rtol=0, atol=0.03)


@pytest.mark.parametrize("kind", ["dense", "hadamard"])
def test_rotation_is_a_function_of_seed_key_shape_kind(kind):
    x = torch.randn(6, 10)
    same = make_rotation((6, 10), kind, seed=3, key="h.0.attn.weight").rotate(x)
    assert torch.equal(same, make_rotation((6, 10), kind, seed=3, key="h.0.attn.weight").rotate(x))
    for other in (make_rotation((6, 10), kind, seed=4, key="h.0.attn.weight"),
                  make_rotation((6, 10), kind, seed=3, key="h.1.attn.weight")):
        assert not torch.allclose(other.rotate(x), same)


def test_rotation_is_identical_in_a_fresh_process_with_another_hash_seed():
    """No dependence on Python's salted hash() or on global RNG state: what ranks and restarts rely on."""
    code = ("import torch; from ds_orthoadam.rotations import make_rotation; torch.manual_seed(123);"
            "x = torch.arange(60, dtype=torch.float64).reshape(6, 10);"
            "print([make_rotation((6, 10), k, 7, 'blk.w', dtype=torch.float64).rotate(x).sum().item()"
            " for k in ('dense', 'hadamard')])")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    x = torch.arange(60, dtype=torch.float64).reshape(6, 10)
    here = [make_rotation((6, 10), k, 7, "blk.w", dtype=torch.float64).rotate(x).sum().item()
            for k in ("dense", "hadamard")]
    # The last line: importing the package may log (DeepSpeed's accelerator notice when DS_ACCELERATOR is unset).
    assert out.stdout.strip().splitlines()[-1] == str(here)


def test_rotation_works_in_float32_and_rejects_a_wrong_shape():
    rotation = make_rotation((4, 6), "dense", key="w", dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float32)
    y = rotation.rotate(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), rotation.rotate(x.double()), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"built for shape \(4, 6\)"):
        rotation.rotate(torch.zeros(6, 4))


def test_unknown_kind_fails_clearly():
    with pytest.raises(RotationKindError, match="unknown rotation kind 'signed_permutation'.*dense, hadamard"):
        make_rotation((4, 4), "signed_permutation")


def test_rotation_nbytes_counts_matrices_signs_and_permutations():
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Embedding(5000, 8))
    # dense: weight 10x6 -> 10^2 + 6^2 floats; bias -> 10^2; the 5000 axis exceeds 4096, so it is a Hadamard axis:
    # 5000 = 5^4 * 2^3 -> 5000 signs + two odd blocks of 25 (each its 25^2 matrix and 3 window sign vectors of 16)
    # and a Haar block of 8 (the first power-of-two block); the embedding's 8-axis is dense: 8^2.
    embedding_axis = 5000 + 2 * (25**2 + 3 * 16) + 8**2
    assert rotation_nbytes(model.named_parameters(), "dense") == 4 * (10**2 + 6**2 + 10**2 + embedding_axis + 8**2)
    # hadamard: 10 = 5 * 2 -> 10 signs + odd block 5 (5^2 + 3 * 4) + Haar 2^2; 6 = 3 * 2 -> 6 + (3^2 + 3 * 2) + 2^2;
    # bias as 10; the 8-axis: 8 + 8^2. (Shared Hadamard blocks are not counted.)
    axis_10, axis_6 = 10 + 25 + 3 * 4 + 4, 6 + 9 + 3 * 2 + 4
    expected = 4 * (axis_10 + axis_6 + axis_10 + embedding_axis + 8 + 64)
    assert rotation_nbytes(model.named_parameters(), "hadamard") == expected
    assert sum(make_rotation(p.shape, "hadamard", key=n).nbytes for n, p in model.named_parameters()) == expected
    # 263 is prime > 256: three windows of 256 signs (float32) and a permutation of 263 int64 indices.
    assert rotation_nbytes([("v", torch.zeros(263))], "hadamard") == 4 * 3 * 256 + 8 * 263
    # An identity long axis takes nothing: only the embedding's 8-axis remains.
    assert rotation_nbytes([("e", torch.zeros(5000, 8))], "dense", long_axis="identity") == 4 * 8**2


@pytest.mark.parametrize("shape,kind", [((6, 10), "dense"), ((64, 12), "hadamard"), ((2, 263), "hadamard"),
                                        ((16,), "hadamard"), ((), "dense"), ((5000, 6), "hadamard-identity"),
                                        ((5000,), "dense-identity")])
def test_workspace_path_matches_the_allocating_path_and_leaves_the_input_alone(shape, kind):
    rotation = build(shape, kind, max_dense_dim=4096, key="w")
    workspace = (torch.full((30000,), float("nan"), dtype=torch.float64),
                 torch.full((30000,), float("nan"), dtype=torch.float64))
    x = torch.randn(shape, dtype=torch.float64)
    original = x.clone()
    rotated = rotation.rotate(x, workspace)
    assert torch.equal(x, original)
    torch.testing.assert_close(rotated, rotation.rotate(x), rtol=0, atol=1e-12)
    # The input of unrotate may itself live in the workspace (how OrthoAdam reuses the rotated gradient's buffer).
    expected = rotation.unrotate(rotated.clone())
    torch.testing.assert_close(rotation.unrotate(rotated, workspace), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(expected, original, rtol=0, atol=1e-12)


def test_scratch_buffers_are_kept_and_grown_on_the_cpu_only():
    scratch = ScratchBuffers()
    first = scratch.get(10, torch.device("cpu"), torch.float32)
    assert [b.numel() for b in first] == [10, 10]
    assert scratch.get(4, torch.device("cpu"), torch.float32) is first  # reused
    grown = scratch.get(30, torch.device("cpu"), torch.float32)
    assert [b.numel() for b in grown] == [30, 30] and scratch.nbytes == 2 * 30 * 4
    assert scratch.get(30, torch.device("meta"), torch.float32) is None  # accelerators: allocate as you go
    assert scratch.nbytes == 2 * 30 * 4
    assert scratch.holds(grown[1][5:20].view(3, 5)) and not scratch.holds(first[0]) and not scratch.holds(
        torch.zeros(30))


def _direct_mixing(rotation, n: int) -> float:
    """n * mean over columns of sum_i Q_ij^4, from the dense matrix of a length-n rotation built column by column."""
    q = full_matrix(rotation, (n,))
    return n * float(q.pow(4).sum(dim=0).mean())


@pytest.mark.parametrize("n,kind,max_dense_dim,long_axis", [
    (96, "hadamard", 4096, "hadamard"),  # 3 * 2^5: an odd windows block, a Haar block, Hadamard blocks
    (344, "hadamard", 4096, "hadamard"),  # 43 * 2^3
    (75, "hadamard", 4096, "hadamard"),  # 25 * 3: odd blocks only
    (60, "dense", 4096, "hadamard"),  # a Haar matrix
    (90, "dense", 8, "hadamard"),  # a long axis of the dense kind: the structured transform
    (50, "dense", 8, "identity"),  # unrotated: no mixing at all, n
])
def test_axis_mixing_of_kronecker_axes_equals_the_direct_computation(n, kind, max_dense_dim, long_axis):
    rotation = make_rotation((n,), kind, seed=3, key="w", max_dense_dim=max_dense_dim, dtype=torch.float64,
                             long_axis=long_axis)
    [axis] = rotation.axes
    assert axis_mixing(axis) == pytest.approx(_direct_mixing(rotation, n), rel=1e-9)
    if long_axis == "identity":
        assert axis_mixing(axis) == n


@pytest.mark.parametrize("n", [263])  # a prime factor above 256: overlapping windows and a permutation
def test_axis_mixing_of_window_axes_is_a_sampled_estimate_and_exact_with_every_column(n):
    rotation = make_rotation((n,), "hadamard", seed=3, key="w", dtype=torch.float64)
    [axis] = rotation.axes
    direct = _direct_mixing(rotation, n)
    assert axis.windows is not None
    assert axis_mixing(axis, sampled_columns=n) == pytest.approx(direct, rel=1e-9)
    assert axis_mixing(axis) == pytest.approx(direct, rel=0.1)  # 64 sampled columns


def test_mixing_of_a_matrix_rotation_is_the_product_of_its_axes_and_haar_is_about_3():
    rotation = make_rotation((24, 20), "dense", seed=1, key="w", dtype=torch.float64)
    q = full_matrix(rotation, (24, 20))
    out_axis, in_axis = rotation.axes
    assert axis_mixing(out_axis) * axis_mixing(in_axis) == pytest.approx(float(q.pow(4).sum()), rel=1e-9)
    haar = [axis_mixing(make_rotation((256,), "dense", seed=0, key=f"p{i}").axes[0]) for i in range(8)]
    assert sum(haar) / len(haar) == pytest.approx(3 * 256 / 258, abs=0.05)  # E sum q^4 = 3 / (n + 2) per column


def test_mixing_by_axis_length_averages_rotated_axes_and_the_frame_summary_prints_it():
    shapes = {"a.weight": (96, 64), "b.weight": (64, 96), "c.weight": (96,), "embed.weight": (300, 64)}
    params = [(name, torch.nn.Parameter(torch.zeros(shape))) for name, shape in shapes.items()]
    spec = RotationSpec("hadamard", max_rotated_dim=200)  # 300 is left unrotated and has no figure
    frame = RotatedFrame(params, spec)
    by_length = mixing_by_axis_length(frame.rotations.values())
    assert list(by_length) == [64, 96]
    rows = {name: frame.rotations[name].axes for name in shapes}
    expected_96 = [axis_mixing(rows["a.weight"][0]), axis_mixing(rows["b.weight"][1]), axis_mixing(rows["c.weight"][0])]
    assert by_length[96] == pytest.approx(sum(expected_96) / 3)
    assert len({round(value, 12) for value in expected_96}) == 3  # each parameter's own random blocks
    summary = frame.summary()
    assert f"mixing n*sum(q^4) by axis length (Haar ~3, unmixed = n) 64: {by_length[64]:.2f}, " \
           f"96: {by_length[96]:.2f}, " in summary
    assert summary.endswith("embed.weight dim 0 (300)")
