"""ds_orthoadam.memory_plan (docs/zero3.md): model states per ZeRO stage, rotations, DeepSpeed's estimators."""
from __future__ import annotations

import pytest

from ds_orthoadam import memory_plan
from ds_orthoadam.models import build_model
from ds_orthoadam.rotations import rotation_nbytes

# Mixed-precision Adam, bytes per parameter: fp16 weights 2, fp16 gradients 2, fp32 gradients 4, fp32 master 4,
# moments 8. ZeRO-1 partitions the fp32 parts, ZeRO-2 the fp16 gradients too, ZeRO-3 the fp16 weights too.
PARTITIONED_FROM_STAGE = {"fp16 weights": (2, 3), "fp16 gradients": (2, 2), "fp32 gradients": (4, 1),
                          "fp32 master": (4, 1), "moments": (8, 1)}


def independent_total(params: int, stage: int, world: int, largest: int) -> float:
    total = sum(nbytes * params / (world if stage >= first else 1)
                for nbytes, first in PARTITIONED_FROM_STAGE.values())
    return total + (4 * largest if stage == 3 else 0)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("world", [2, 8, 32])
def test_model_states_of_a_small_model_follow_the_bytes_per_parameter(stage, world):
    model = build_model("llama-tiny")
    params = sum(p.numel() for p in model.parameters())
    largest = memory_plan.largest_layer_params(model)
    assert largest == model.model.embed_tokens.weight.numel()  # 8192 x 128, the biggest single module
    states = memory_plan.model_states(params, stage, world, largest)
    assert states.total == pytest.approx(independent_total(params, stage, world, largest), abs=4)
    assert states.optimizer == 12 * params // world


@pytest.mark.parametrize("world", [8, 16, 32])
def test_zero2_plan_is_deepspeeds_estimate_and_zero3_counts_the_fp16_partition_it_leaves_out(world):
    params, largest = 6_738_415_616, 131_072_000
    zero2 = memory_plan.model_states(params, 2, world, largest)
    assert abs(zero2.total - memory_plan.deepspeed_estimate(params, 2, world, largest)) <= 4
    zero3 = memory_plan.model_states(params, 3, world, largest)
    assert abs(zero3.total - memory_plan.deepspeed_estimate(params, 3, world, largest) - 2 * params / world) <= 4


@pytest.mark.parametrize("kind", ["hadamard", "dense"])
def test_rotation_bytes_equal_the_optimizers_own_rotations(kind):
    """The plan's per-shape count (a dense axis as its n x n fp32 matrix, without building it) equals the bytes of
    the rotations OrthoAdam builds for every parameter (rotations.rotation_nbytes, one per parameter)."""
    model = build_model("gpt2-tiny")
    assert memory_plan.rotation_bytes(model, kind) == rotation_nbytes(model.named_parameters(), kind)


def test_the_plan_prints_a_row_per_model_gpus_and_stage(capsys):
    assert memory_plan.main(["--models", "llama-1.4b", "--gpus", "8"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 8 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "2", "3"]


@pytest.mark.e2e
def test_measured_per_rank_model_states_on_two_cpu_ranks(tmp_path):
    """bench/zero_memory.py (2 CPU ranks, DeepSpeed's fp16 ZeRO, a 6.8M-parameter Llama): what a rank holds is
    (2 + 2) bytes per parameter whole + 12 / N at ZeRO-1 (fp16 weights and gradients; fp32 master and moments) and
    20 / N at ZeRO-3 (everything partitioned, the step's fp32 gradient included), within 2% (DeepSpeed's buckets,
    buffers); the plan's model states bound it from above."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, str(repo / "bench" / "zero_memory.py"), "--out", str(tmp_path), "--json"],
                            capture_output=True, text=True, timeout=600, cwd=repo)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted((r["stage"], r["rank"]) for r in records) == [(1, 0), (1, 1), (3, 0), (3, 1)]
    world = 2
    for record in records:
        params, stage = record["params"], record["stage"]
        measured = max(record["after_backward"], record["in_step"])
        expected = 4 * params + 12 * params / world if stage == 1 else 20 * params / world
        assert measured == pytest.approx(expected, rel=0.02), record
        assert measured <= memory_plan.model_states(params, stage, world, record["largest_layer"]).total
