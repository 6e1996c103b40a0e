"""The compiled CPU rotation kernel: same Q as the GEMM path and as torch.kron, used where it applies, optional."""
import functools
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ds_orthoadam import kron_cpu
from ds_orthoadam.rotations import ScratchBuffers, make_rotation

pytestmark = pytest.mark.skipif(kron_cpu.library() is None, reason="no C++ compiler: the CPU kernel cannot be built")

# Shapes that reach every kernel path: in-vector butterflies (512 = 8*8*8), rows shorter than a vector (1376 = 43*8*4),
# out-axis tiles with a narrow remainder (inner length not a multiple of the tile width), vectors, odd parts (window
# digits on either axis, inside or below a vector, wider than MAX_FACTOR: 67, 127), a vocabulary-like long axis
# (32000 = 25*5*16*16; rotated here with max_rotated_dim=None), a single column, and sizes too small for one SIMD
# vector.
SHAPES = [(512,), (96, 512), (1376, 64), (64, 1376), (250, 40), (7, 24), (3, 5, 8), (48, 1), (1, 48), (32000, 8),
          (2, 3), (12, 12), (67, 16), (16, 254)]


def gemm_path(rotation):
    """Disable the kernel for this rotation object: rotate/unrotate fall back to the GEMM path."""
    for transpose in (False, True):
        for dtype in (torch.float32, torch.float64):
            rotation._cpu_plans[(transpose, dtype)] = None


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("long_axis", ["hadamard", "identity"])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_the_gemm_path(shape, long_axis, dtype, atol, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rotation = make_rotation(shape, "hadamard", seed=3, key="w", max_dense_dim=1000, dtype=dtype,
                                 long_axis=long_axis, max_rotated_dim=None)
        x = torch.randn(shape, dtype=dtype)
        workspace = ScratchBuffers().get(x.numel(), x.device, dtype)
        fast = [rotation.rotate(x), rotation.unrotate(x), rotation.rotate(x, workspace).clone(),
                rotation.unrotate(x, workspace).clone()]
        assert rotation._cpu_plans[(False, dtype)] is not None and rotation._cpu_plans[(True, dtype)] is not None
        gemm_path(rotation)
        reference = [rotation.rotate(x), rotation.unrotate(x)] * 2
    finally:
        torch.set_num_threads(previous)
    for got, expected in zip(fast, reference):
        assert got.shape == x.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def kron_reference(rotation) -> torch.Tensor:
    """Q = kron(all factors) @ diag(kron(all signs)), built independently of either application path."""
    factors = [f for axis in rotation.axes for f in (axis.factors or [torch.eye(axis.size, dtype=torch.float64)])]
    signs = [axis.signs if axis.signs is not None else torch.ones(axis.size, dtype=torch.float64)
             for axis in rotation.axes]
    return functools.reduce(torch.kron, factors) @ torch.diag(functools.reduce(torch.kron, signs))


@pytest.mark.parametrize("kind", ["hadamard", "dense"])
@pytest.mark.parametrize("shape", [(40, 24), (20, 48), (33, 64), (64,), (6, 5, 4)])
def test_kernel_applies_the_kronecker_product_of_the_factors(shape, kind):
    rotation = make_rotation(shape, kind, seed=1, key="k", dtype=torch.float64)
    q = kron_reference(rotation)
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(rotation.rotate(x).reshape(-1), q @ x.reshape(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(rotation.unrotate(x).reshape(-1), q.T @ x.reshape(-1), rtol=0, atol=1e-12)
    assert rotation._cpu_plans[(False, torch.float64)] is not None


@pytest.mark.parametrize("shape,kind,reason", [
    ((512, 64), "dense", "a 512-wide dense factor is left to BLAS"),
    ((263,), "hadamard", "a prime length uses overlapping windows"),
])
def test_kernel_is_not_used_where_it_does_not_apply(shape, kind, reason):
    rotation = make_rotation(shape, kind, key="w")
    rotation.rotate(torch.randn(shape))
    assert rotation._cpu_plans[(False, torch.float32)] is None, reason
    bf16 = torch.randn(shape, dtype=torch.bfloat16)
    assert rotation._cpu_plan(bf16, transpose=False) is None


def test_plan_rejects_tensors_that_do_not_fit():
    rotation = make_rotation((8, 16), "hadamard", key="w")
    plan = rotation._cpu_plan(torch.randn(8, 16), transpose=False)
    with pytest.raises(ValueError, match="KronPlan for 8x16"):
        plan(torch.randn(8, 16), torch.empty(8, 15))
    with pytest.raises(ValueError, match="contiguous"):
        plan(torch.randn(16, 8).T, torch.empty(8, 16))


def test_a_failed_build_warns_once_and_rotations_use_the_gemm_path(monkeypatch):
    def no_compiler():
        raise OSError("c++: command not found")

    monkeypatch.setattr(kron_cpu, "_library", None)
    monkeypatch.setattr(kron_cpu, "_unavailable", False)
    monkeypatch.setattr(kron_cpu, "_build", no_compiler)
    rotation = make_rotation((16, 24), "hadamard", key="w", dtype=torch.float64)
    x = torch.randn(16, 24, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="c\\+\\+: command not found.*GEMM path"):
        rotated = rotation.rotate(x)
    assert rotation._cpu_plans[(False, torch.float64)] is None
    torch.testing.assert_close(rotated.reshape(-1), kron_reference(rotation) @ x.reshape(-1), rtol=0, atol=1e-12)
    assert kron_cpu.library() is None  # not retried


def test_the_pip_installed_ninja_is_put_on_path_when_none_is_there(monkeypatch):
    ninja = pytest.importorskip("ninja")
    monkeypatch.setattr(kron_cpu.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nonexistent")
    kron_cpu._ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
    assert os.path.exists(os.path.join(ninja.BIN_DIR, "ninja"))


def test_avx2_code_only_where_the_cpu_has_it(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(kron_cpu.platform, "machine", lambda: "x86_64")
    real_path = kron_cpu.Path
    monkeypatch.setattr(kron_cpu, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx fma avx2\n")
    assert kron_cpu._has_avx2_fma()
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 sse4_2 avx\n")
    assert not kron_cpu._has_avx2_fma()
    monkeypatch.setattr(kron_cpu.platform, "machine", lambda: "aarch64")
    assert not kron_cpu._has_avx2_fma()


def test_the_portable_build_matches_the_gemm_path(monkeypatch):
    """The build without AVX2/FMA (older x86, aarch64 hosts such as Grace: where exports and analyses rotate on
    the CPU) computes the same rotations; here it is built next to the AVX2 one."""
    monkeypatch.setattr(kron_cpu, "_has_avx2_fma", lambda: False)
    monkeypatch.setattr(kron_cpu, "_library", None)
    monkeypatch.setattr(kron_cpu, "_unavailable", False)
    assert kron_cpu.library() is not None
    assert_the_loaded_kernel_matches_the_gemm_path()


@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ is not installed (.ci/run installs it)")
@pytest.mark.parametrize("isa_flags", [["-mavx2", "-mfma"], []], ids=["avx2", "portable"])
def test_a_clang_build_matches_the_gemm_path(monkeypatch, tmp_path, isa_flags):
    """clang (macOS, many aarch64 toolchains) type-checks the vector code differently from GCC: GCC compiled a
    4-lane shuffle in a template branch that 8-lane vectors never take, clang refused it."""
    if isa_flags and not kron_cpu._has_avx2_fma():
        pytest.skip("this CPU has no AVX2/FMA")
    path = tmp_path / "kron_cpu_clang.so"
    subprocess.run(["clang++", "-O2", "-std=c++17", "-shared", "-fPIC", *isa_flags, str(kron_cpu.SOURCE), "-o",
                    str(path)], check=True, capture_output=True)
    monkeypatch.setattr(kron_cpu, "_library", kron_cpu.load(path))
    assert_the_loaded_kernel_matches_the_gemm_path()


def assert_the_loaded_kernel_matches_the_gemm_path():
    for shape in SHAPES:
        for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
            rotation = make_rotation(shape, "hadamard", seed=3, key="w", max_dense_dim=1000, dtype=dtype,
                                     max_rotated_dim=None)
            x = torch.randn(shape, dtype=dtype)
            fast = [rotation.rotate(x), rotation.unrotate(x)]
            assert rotation._cpu_plans[(False, dtype)] is not None
            gemm_path(rotation)
            for got, expected in zip(fast, [rotation.rotate(x), rotation.unrotate(x)]):
                torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def test_the_environment_variable_turns_the_kernel_off():
    code = ("import torch; from ds_orthoadam import kron_cpu; from ds_orthoadam.rotations import make_rotation;"
            "r = make_rotation((16, 24), 'hadamard', key='w'); r.rotate(torch.randn(16, 24));"
            "print(kron_cpu.library() is None, r._cpu_plans[(False, torch.float32)] is None)")
    env = {**os.environ, kron_cpu.DISABLE_ENV: "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip().splitlines()[-1] == "True True"


def test_kernel_rotation_of_a_model_sized_parameter_is_orthogonal():
    """A vocabulary-sized embedding in float64: norms are preserved and unrotate inverts rotate."""
    x = torch.randn(32000, 64, dtype=torch.float64)
    rotation = make_rotation(x.shape, "hadamard", key="embed", dtype=torch.float64, max_rotated_dim=None)
    y = rotation.rotate(x)
    assert math.isclose(y.norm().item(), x.norm().item(), rel_tol=1e-12)
    torch.testing.assert_close(rotation.unrotate(y), x, rtol=0, atol=1e-12)
