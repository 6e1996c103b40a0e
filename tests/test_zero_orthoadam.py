"""OrthoAdam inside DeepSpeed: exactness against single-process OrthoAdam on 2 ranks, checkpoints, config errors,
and the DeepSpeed internals contract (ds_orthoadam/ds_internals.py) checked in-process on one rank.

The 2-rank runs happen in two ``deepspeed --num_gpus 2`` launches of tests/zero_worker.py (one for all training
cases, one for the resume in a new process); each case's result is compared here with a reference computed in this
process by ``ds_orthoadam.OrthoAdam`` on the same global batches (tests/zero_harness.py).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_orthoadam.zero_orthoadam import DeepSpeedConfigError, export_fp32_state_dict, resolve_config
from zero_harness import ds_config, max_abs_diff, reference_run

TESTS_DIR = Path(__file__).resolve().parent
FP32_TOL = 1e-5
# bf16 forward/backward perturbs every gradient by ~1e-2 relative; the AdamW control moves ~5x further (checked).
BF16_TOL = 4e-3
TRAIN_CASES = [
    "llama:1:fp32:OrthoAdam:save10", "gpt2:1:fp32:OrthoAdam",
    "llama:1:fp32:AdamW", "gpt2:1:fp32:AdamW",
    "llama:0:fp32:OrthoAdam", "llama:2:fp32:OrthoAdam", "gpt2:2:fp32:OrthoAdam",
    "llama:1:bf16:OrthoAdam", "llama:1:bf16:AdamW", "llama:0:bf16:OrthoAdam",
    "llama:1:fp32:OrthoAdam:overflow7",
]
RESUME_CASES = ["llama:1:fp32:OrthoAdam:resume10"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir: Path, cases: list[str]) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR.parent), str(TESTS_DIR)])}
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(_free_port()), str(TESTS_DIR / "zero_worker.py"), "--out", str(out_dir), "--cases", *cases]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Results of every 2-rank case, keyed by case name (two launches: train, then resume in new processes)."""
    out_dir = tmp_path_factory.mktemp("zero")
    _launch(out_dir, TRAIN_CASES)
    _launch(out_dir, RESUME_CASES)
    results = {case: torch.load(out_dir / f"{case.replace(':', '_')}.pt", weights_only=False)
               for case in TRAIN_CASES + RESUME_CASES}
    results["checkpoint_dir"] = out_dir / "ckpt-llama"
    return results


@pytest.fixture(scope="module")
def references() -> dict[str, dict]:
    return {family: reference_run(family) for family in ("llama", "gpt2")}


@pytest.mark.parametrize("case", ["llama:1:fp32:OrthoAdam:save10", "gpt2:1:fp32:OrthoAdam", "llama:0:fp32:OrthoAdam",
                                  "llama:2:fp32:OrthoAdam", "gpt2:2:fp32:OrthoAdam"])
def test_fp32_equals_single_process_orthoadam(runs, references, case):
    family = case.split(":")[0]
    reference, clipped = references[family]
    assert all(clipped), "the harness must exercise gradient clipping"
    assert runs[case]["skipped_steps"] == 0
    assert max_abs_diff(runs[case]["final"], reference) <= FP32_TOL


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adamw_negative_control_differs_far_more(runs, references, family):
    reference, _ = references[family]
    assert max_abs_diff(runs[f"{family}:1:fp32:AdamW"]["final"], reference) > 100 * FP32_TOL


@pytest.mark.parametrize("case", ["llama:1:bf16:OrthoAdam", "llama:0:bf16:OrthoAdam"])
def test_bf16_within_bf16_tolerance_and_control_outside(runs, references, case):
    reference, _ = references["llama"]
    assert max_abs_diff(runs[case]["final"], reference) <= BF16_TOL
    assert max_abs_diff(runs["llama:1:bf16:AdamW"]["final"], reference) > 2 * BF16_TOL


def test_zero1_shards_moments_and_reports_rotation_memory(runs):
    facts = runs["llama:1:fp32:OrthoAdam:save10"]
    unsharded = 2 * 4 * facts["param_numel"]  # exp_avg + exp_avg_sq in fp32
    for per_rank in facts["moment_bytes_per_rank"]:
        assert abs(per_rank - unsharded / 2) <= 2 * 4 * 64  # up to alignment padding
    assert facts["rotation_nbytes"] > 0


def test_overflow_skip_leaves_params_moments_and_step_count_unchanged(runs):
    facts = runs["llama:1:fp32:OrthoAdam:overflow7"]
    before, after = facts["before_skip"], facts["after_skip"]
    assert facts["skipped_steps"] == 1 and not facts["step_applied_at_skip"]
    for key in ("module", "exp_avg_full"):
        assert all(torch.equal(before[key][name], after[key][name]) for name in before[key])
    assert all(torch.equal(a, b) for a, b in zip(before["master"], after["master"]))
    for state_before, state_after in zip(before["state"], after["state"]):
        assert state_before.keys() == state_after.keys()
        assert all(torch.equal(torch.as_tensor(state_before[k]), torch.as_tensor(state_after[k]))
                   for k in state_before)
    reference, _ = reference_run("llama", skipped_steps=(7,))
    assert max_abs_diff(facts["final"], reference) <= FP32_TOL


def test_resume_in_new_process_is_bit_identical(runs):
    resumed, uninterrupted = runs["llama:1:fp32:OrthoAdam:resume10"], runs["llama:1:fp32:OrthoAdam:save10"]
    assert resumed["client_state"]["next_step"] == 10
    assert all(torch.equal(resumed["final"][k], uninterrupted["final"][k]) for k in uninterrupted["final"])


def test_export_gives_real_weights_not_rotated_frame(runs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    theta = runs["llama:1:fp32:OrthoAdam:save10"]["weights_at_save"]
    exported = export_fp32_state_dict(str(runs["checkpoint_dir"]), tag="step10")
    assert max_abs_diff(exported, theta) <= 1e-6
    rotated = get_fp32_state_dict_from_zero_checkpoint(str(runs["checkpoint_dir"]), tag="step10")
    assert max_abs_diff(rotated, theta) > 1e-2


# ------------------------------------------------------------------------------------------- config errors


def _orthoadam_config(**params) -> dict:
    config = ds_config(stage=1)
    config["optimizer"]["params"].update(params)
    return config


def test_orthoadam_translates_to_deepspeed_adamw_and_other_names_pass_through():
    translated, spec = resolve_config(_orthoadam_config(rotation="hadamard", seed=7))
    assert translated["optimizer"]["type"] == "AdamW" and "rotation" not in translated["optimizer"]["params"]
    assert (spec.rotation, spec.seed) == ("hadamard", 7)
    for name in ("AdamW", "Lamb", "SGD"):
        config = {**ds_config(stage=1), "optimizer": {"type": name, "params": {"lr": 0.1}}}
        assert resolve_config(config) == (config, None)


@pytest.mark.parametrize("config, field", [
    ({"optimizer": {"type": "OrthoAdamm"}}, "optimizer.type"),
    (_orthoadam_config(lr="fast"), "optimizer.params.lr"),
    (_orthoadam_config(betas=0.9), "optimizer.params.betas"),
    (_orthoadam_config(seed=1.5), "optimizer.params.seed"),
    (_orthoadam_config(rotation="permutation"), "optimizer.params.rotation"),
    (_orthoadam_config(momentum=0.9), "optimizer.params.momentum"),
    ({**_orthoadam_config(), "zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
    ({**_orthoadam_config(), "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}},
     "zero_optimization.offload_optimizer"),
])
def test_config_errors_name_the_field(config, field):
    with pytest.raises(DeepSpeedConfigError, match=field.replace(".", r"\.")):
        resolve_config(config)
