"""OrthoAdam inside DeepSpeed: exactness against single-process OrthoAdam on 2 ranks, checkpoints, config errors,
and the DeepSpeed internals contract (ds_orthoadam/ds_internals.py) checked in-process on one rank.

The 2-rank runs happen in two ``deepspeed --num_gpus 2`` launches of tests/zero_worker.py (one for all training
cases, one for the resume in a new process); each case's result is compared here with a reference computed in this
process by ``ds_orthoadam.OrthoAdam`` on the same global batches (tests/zero_harness.py).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import deepspeed
import pytest
import torch

import ds_orthoadam
from ds_orthoadam.distributed import free_port
from ds_orthoadam.zero_orthoadam import (ROTATION_STATE_KEY, DeepSpeedConfigError, RotationMismatchError,
                                         export_fp32_state_dict, resolve_config)
from ds_orthoadam.orthoadam import OrthoAdam
from zero_harness import (BETAS, CLIP, EPS, FP16, GRAD_ACCUM, LR, ROTATION, SEED, STEPS, WEIGHT_DECAY, ds_config,
                          init_single_rank_process_group, loss_of, max_abs_diff, micro_batch, reference_run,
                          relative_update_error, tiny_model)
from deepspeed.utils import safe_get_full_fp32_param

TESTS_DIR = Path(__file__).resolve().parent
FP32_TOL = 1e-5
# bf16 and fp16 are judged by the relative update error (zero_harness.relative_update_error) against DeepSpeed's own
# error in that precision: plain DeepSpeed AdamW in the same config vs its fp32 run. Measured: bf16 stage 1 OrthoAdam
# 0.040 vs AdamW 0.030; stage 0 (bf16 gradient accumulation) 0.122 vs 0.119; fp16 (loss scale 2^8) stage 0/1/2
# OrthoAdam 0.127/0.0094/0.0092 vs AdamW 0.127/0.0091/-; the AdamW control vs OrthoAdam ~0.5; fp32 1.6e-5.
LOW_PRECISION_ERROR_FACTOR = 2.0
TRAIN_CASES = [
    "llama:1:fp32:OrthoAdam:save10", "gpt2:1:fp32:OrthoAdam:save10",
    "llama:1:fp32:AdamW", "gpt2:1:fp32:AdamW",
    "llama:0:fp32:OrthoAdam", "llama:2:fp32:OrthoAdam", "gpt2:2:fp32:OrthoAdam",
    "llama:1:bf16:OrthoAdam", "llama:1:bf16:AdamW", "llama:0:bf16:OrthoAdam", "llama:0:bf16:AdamW",
    "llama:1:fp32:OrthoAdam:overflow7", "llama:1:fp32:OrthoAdam:overlap", "llama:1:bf16:OrthoAdam:accum32",
    # fp16 runs DeepSpeed's own fp16 machinery on the CPU (tests/fp16_on_cpu/sitecustomize.py).
    "llama:0:fp16:OrthoAdam", "llama:1:fp16:OrthoAdam", "llama:2:fp16:OrthoAdam",
    "llama:0:fp16:AdamW", "llama:1:fp16:AdamW", "llama:2:fp16:AdamW", "llama:1:fp16:OrthoAdam:overflow7",
    # ZeRO-3: partitions in the rotated frame, gathered parameters rotated back (weights read through
    # GatheredParameters, as an export does).
    "llama:3:fp32:OrthoAdam:save10", "gpt2:3:fp32:OrthoAdam:save10", "llama:3:fp32:OrthoAdam:overflow7",
    "llama:3:bf16:OrthoAdam", "llama:3:bf16:AdamW", "llama:3:fp16:OrthoAdam", "llama:3:fp16:AdamW",
    # Activation checkpointing: each layer's recomputation gathers (and rotates to theta) again.
    "llama:3:fp32:OrthoAdam:ckpt",
]
RESUME_CASES = ["llama:1:fp32:OrthoAdam:resume10", "llama:3:fp32:OrthoAdam:resume10", "gpt2:3:fp32:OrthoAdam:resume10"]


def _launch(out_dir: Path, cases: list[str]) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR.parent), str(TESTS_DIR), str(TESTS_DIR / "fp16_on_cpu")])}
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(free_port()), str(TESTS_DIR / "zero_worker.py"), "--out", str(out_dir), "--cases", *cases]
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
    results["checkpoint_dirs"] = {(family, stage): out_dir / f"ckpt-{family}{suffix}" for family in ("llama", "gpt2")
                                  for stage, suffix in ((1, ""), (3, "-zero3"))}
    return results


@pytest.fixture(scope="module")
def references() -> dict[str, dict]:
    return {family: reference_run(family) for family in ("llama", "gpt2")}


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["llama:1:fp32:OrthoAdam:save10", "gpt2:1:fp32:OrthoAdam:save10", "llama:0:fp32:OrthoAdam",
                                  "llama:2:fp32:OrthoAdam", "gpt2:2:fp32:OrthoAdam", "llama:1:fp32:OrthoAdam:overlap",
                                  "llama:3:fp32:OrthoAdam:save10", "gpt2:3:fp32:OrthoAdam:save10",
                                  "llama:3:fp32:OrthoAdam:ckpt"])
def test_fp32_equals_single_process_orthoadam(runs, references, case):
    family = case.split(":")[0]
    reference, clipped = references[family]
    assert all(clipped), "the harness must exercise gradient clipping"
    assert runs[case]["skipped_steps"] == 0
    assert max_abs_diff(runs[case]["final"], reference) <= FP32_TOL


@pytest.mark.e2e
def test_zero3_cases_cover_released_and_persistent_parameters(runs):
    """llama: every parameter gathered on use and released (forward and backward fetches); gpt2: all persistent
    (ZeRO-3's default threshold), gathered once after each step."""
    assert runs["llama:3:fp32:OrthoAdam:save10"]["persistent_params"] == 0
    gpt2 = runs["gpt2:3:fp32:OrthoAdam:save10"]
    assert gpt2["persistent_params"] == gpt2["rotated_params"] > 0


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adamw_negative_control_differs_far_more(runs, references, family):
    reference, _ = references[family]
    assert max_abs_diff(runs[f"{family}:1:fp32:AdamW"]["final"], reference) > 100 * FP32_TOL


@pytest.mark.e2e
@pytest.mark.parametrize("precision,stage", [("bf16", 1), ("bf16", 0), ("fp16", 0), ("fp16", 1), ("fp16", 2),
                                             ("bf16", 3), ("fp16", 3)])
def test_low_precision_error_is_deepspeeds_own_and_control_differs(runs, references, precision, stage):
    reference, _ = references["llama"]
    initial = tiny_model("llama").state_dict()
    adamw = runs[f"llama:{stage}:{precision}:AdamW"]["final"]
    deepspeed_error = relative_update_error(adamw, runs["llama:1:fp32:AdamW"]["final"], initial)
    orthoadam = runs[f"llama:{stage}:{precision}:OrthoAdam"]
    orthoadam_error = relative_update_error(orthoadam["final"], reference, initial)
    assert orthoadam_error <= LOW_PRECISION_ERROR_FACTOR * deepspeed_error
    assert relative_update_error(adamw, reference, initial) > 2 * orthoadam_error
    assert orthoadam["skipped_steps"] == 0
    if precision == "fp16":  # rotated fp16 gradients never overflowed: the dynamic loss scale never dropped
        assert orthoadam["loss_scale_per_step"] == [2.0 ** FP16["initial_scale_power"]] * STEPS


@pytest.mark.e2e
@pytest.mark.parametrize("case, once_per_step", [
    ("llama:1:fp32:OrthoAdam:save10", True), ("gpt2:1:fp32:OrthoAdam:save10", True), ("llama:0:fp32:OrthoAdam", True),
    ("llama:1:bf16:OrthoAdam", True), ("llama:0:bf16:OrthoAdam", True),
    ("llama:1:fp16:OrthoAdam", True), ("llama:0:fp16:OrthoAdam", True), ("llama:2:fp16:OrthoAdam", False),
    # ZeRO-1 + overlap_comm reduces inside the boundary backward: the boundary tensor hook rotates the step's sum.
    ("llama:1:fp32:OrthoAdam:overlap", True),
    # DeepSpeed takes each micro-batch's gradient during its backward: rotated by the per-micro-batch hook.
    ("llama:2:fp32:OrthoAdam", False),
    ("llama:1:bf16:OrthoAdam:accum32", False),
    # ZeRO-3 reduce-scatters each micro-batch's gradient during its backward (gathers rotate back with Q^T: not
    # counted).
    ("llama:3:fp32:OrthoAdam:save10", False),
])
def test_gradients_rotated_once_per_step_where_deepspeed_reduces_only_at_the_boundary(runs, case, once_per_step):
    """Counts every Q x of the training loop: one per parameter per optimiser step at ZeRO 0/1 (+ one per parameter
    for the rotation into phi at fp32 stage 0, where AdamW steps the module), GRAD_ACCUM per step elsewhere. The
    same runs are checked for exactness above."""
    facts = runs[case]
    assert facts["rotates_once_per_step"] is once_per_step
    gradient_rotations = facts["rotated_params"] * (1 if once_per_step else GRAD_ACCUM)
    into_phi = 0 if facts["master_copy"] else facts["rotated_params"]
    assert facts["rotate_calls_per_step"] == [gradient_rotations + into_phi] * STEPS


@pytest.mark.e2e
def test_bf16_fp32_accumulation_per_micro_batch_rotation_is_within_deepspeeds_error(runs, references):
    """bf16 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer, per-micro-batch rotation)."""
    reference, _ = references["llama"]
    initial = tiny_model("llama").state_dict()
    adamw_fp32 = runs["llama:1:fp32:AdamW"]["final"]
    deepspeed_bf16_error = relative_update_error(runs["llama:1:bf16:AdamW"]["final"], adamw_fp32, initial)
    error = relative_update_error(runs["llama:1:bf16:OrthoAdam:accum32"]["final"], reference, initial)
    assert error <= LOW_PRECISION_ERROR_FACTOR * deepspeed_bf16_error


@pytest.mark.e2e
def test_zero1_shards_moments_and_reports_rotation_memory(runs):
    facts = runs["llama:1:fp32:OrthoAdam:save10"]
    unsharded = 2 * 4 * facts["param_numel"]  # exp_avg + exp_avg_sq in fp32
    for per_rank in facts["moment_bytes_per_rank"]:
        assert abs(per_rank - unsharded / 2) <= 2 * 4 * 64  # up to alignment padding
    assert facts["rotation_nbytes"] > 0


@pytest.mark.e2e
@pytest.mark.parametrize("precision,stage", [("fp32", 1), ("fp16", 1), ("fp32", 3)])
def test_overflow_skip_leaves_params_moments_and_step_count_unchanged(runs, references, precision, stage):
    """An inf loss on one rank at step 7: DeepSpeed skips the step on every rank (with fp16 its dynamic loss scaler
    halves the scale), which must equal training without step 7's batch. Under ZeRO-3 no parameter is re-gathered
    after a skipped step: the next forward's gathers must still yield theta."""
    facts = runs[f"llama:{stage}:{precision}:OrthoAdam:overflow7"]
    before, after = facts["before_skip"], facts["after_skip"]
    assert facts["skipped_steps"] == 1 and not facts["step_applied_at_skip"]
    for key in ("module", "exp_avg_full"):
        assert all(torch.equal(before[key][name], after[key][name]) for name in before[key])
    assert all(torch.equal(a, b) for a, b in zip(before["master"], after["master"]))
    for state_before, state_after in zip(before["state"], after["state"]):
        assert state_before.keys() == state_after.keys()
        assert all(torch.equal(torch.as_tensor(state_before[k]), torch.as_tensor(state_after[k]))
                   for k in state_before)
    without_step_7, _ = reference_run("llama", skipped_steps=(7,))
    if precision == "fp32":
        assert max_abs_diff(facts["final"], without_step_7) <= FP32_TOL
        return
    scale = 2.0 ** FP16["initial_scale_power"]
    assert facts["loss_scale_per_step"] == [scale] * 7 + [scale / 2] * (STEPS - 7)
    initial = tiny_model("llama").state_dict()
    deepspeed_error = relative_update_error(runs["llama:1:fp16:AdamW"]["final"], runs["llama:1:fp32:AdamW"]["final"],
                                            initial)
    error = relative_update_error(facts["final"], without_step_7, initial)
    assert error <= LOW_PRECISION_ERROR_FACTOR * deepspeed_error
    with_step_7, _ = references["llama"]
    assert relative_update_error(facts["final"], with_step_7, initial) > 10 * error


@pytest.mark.e2e
@pytest.mark.parametrize("family,stage", [("llama", 1), ("llama", 3), ("gpt2", 3)])  # ZeRO-3 gpt2: persistent
def test_resume_in_new_process_is_bit_identical(runs, family, stage):
    resumed = runs[f"{family}:{stage}:fp32:OrthoAdam:resume10"]
    uninterrupted = runs[f"{family}:{stage}:fp32:OrthoAdam:save10"]
    assert resumed["client_state"]["next_step"] == 10
    saved = uninterrupted["weights_at_save"]
    assert all(torch.equal(resumed["weights_after_load"][k], saved[k]) for k in saved)
    assert all(torch.equal(resumed["final"][k], uninterrupted["final"][k]) for k in uninterrupted["final"])


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: tied embeddings appear under two names
@pytest.mark.parametrize("stage", [1, 3])
def test_export_gives_real_weights_not_rotated_frame(runs, family, stage):
    """theta: the module's weights at the save (under ZeRO-3 as GatheredParameters yields them)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    theta = runs[f"{family}:{stage}:fp32:OrthoAdam:save10"]["weights_at_save"]
    checkpoint_dir = str(runs["checkpoint_dirs"][(family, stage)])
    exported = export_fp32_state_dict(checkpoint_dir, tag="step10")
    assert max_abs_diff(exported, theta) <= 1e-6
    rotated = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag="step10")
    assert max_abs_diff(rotated, theta) > 1e-2


@pytest.mark.parametrize("stage,rotation_params", [(0, {}), (1, {}), (2, {}), (1, {"max_rotated_dim": 100}), (3, {})])
def test_param_groups_train_as_single_process_orthoadam_with_the_same_groups(stage, rotation_params):
    """The usual no-weight-decay group for 1-D parameters. Under ZeRO-1/2 DeepSpeed replaces each group's params by
    its flat partition during initialize; the frame was once read after that and came out empty (plain AdamW).
    ``max_rotated_dim=100``: the vocabulary (256), attention (128) and MLP (160) axes are left unrotated, the hidden
    axis (64) not. ZeRO-3 on one rank: a gather hands out a view of the partition, which must not be rotated in
    place."""
    init_single_rank_process_group()
    model, reference = tiny_model("llama"), tiny_model("llama")

    def groups(module: torch.nn.Module, with_names: bool) -> list[dict]:
        split = [[(n, p) for n, p in module.named_parameters() if (p.ndim > 1) == decay] for decay in (True, False)]
        return [{"params": [p for _, p in named], **({"param_names": [n for n, _ in named]} if with_names else {}),
                 **({} if decay else {"weight_decay": 0.0})} for named, decay in zip(split, (True, False))]

    config = {**ds_config(stage=stage), "gradient_accumulation_steps": 1}
    config["optimizer"]["params"].update(rotation_params)
    engine, *_ = ds_orthoadam.initialize(model=model, model_parameters=iter(groups(model, False)), config=config)
    optimizer = OrthoAdam(groups(reference, True), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                          rotation=ROTATION, seed=SEED, **rotation_params)
    for step in range(3):
        tokens = micro_batch(step, 0, 0)
        engine.backward(loss_of(engine, tokens))
        engine.step()
        loss_of(reference, tokens).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        assert max_abs_diff(engine.module.state_dict(), reference.state_dict()) < 1e-5


def test_zero3_with_activation_checkpointing_equals_single_process_orthoadam():
    """Activation checkpointing re-runs each layer's forward inside the backward, so ZeRO-3 gathers the layer's
    weights a third time per micro-batch (counted in the first step; from the second on, DeepSpeed keeps this tiny
    model's layer gathered from the forward to the step: one gather); each gather must yield theta. One rank."""
    init_single_rank_process_group()
    model, reference = tiny_model("llama"), tiny_model("llama")
    # Reentrant: DeepSpeed ZeRO-3 (plain AdamW too) fails torch's non-reentrant checkpoint's saved-tensor check.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    config = {**ds_config(stage=3), "gradient_accumulation_steps": 1}
    # Released after every use, not kept for a reuse (stage3_max_reuse_distance): each use is a new gather.
    config["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0)
    engine, *_ = ds_orthoadam.initialize(model=model, model_parameters=model.parameters(), config=config)
    optimizer = OrthoAdam(reference.named_parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                          rotation=ROTATION, seed=SEED)
    layer_weight = "model.layers.0.mlp.up_proj.weight"
    rotation, gathers = engine.orthoadam_frame.rotations[layer_weight], [0]

    def counted(x, workspace=None, _unrotate=rotation.unrotate):
        gathers[0] += 1
        return _unrotate(x, workspace)

    rotation.unrotate = counted
    for step in range(3):
        tokens = micro_batch(step, 0, 0)
        engine.backward(loss_of(engine, tokens))
        engine.step()
        if step == 0:  # forward, recomputation inside the backward, backward: three gathers
            assert gathers[0] == 3
        loss_of(reference, tokens).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        assert max_abs_diff(engine.module.state_dict(), reference.state_dict()) < 1e-5


@pytest.mark.parametrize("stage,precision,partitions", [(0, "fp32", []), (0, "bf16", []),
                                                        (1, "bf16-fp32-accumulation", ["bf16_zero_pp_rank_0"])])
def test_export_of_a_checkpoint_zero_to_fp32_cannot_read_gives_the_engines_real_weights(tmp_path, stage, precision,
                                                                                         partitions):
    """ZeRO stage 0 writes no optimizer partition files, DeepSpeed's BF16_Optimizer (bf16 with fp32 gradient
    accumulation) writes bf16_zero_* ones; zero_to_fp32 reads neither: the export takes the module."""
    config = ds_config(stage=stage, precision=precision.split("-")[0])
    if precision.endswith("fp32-accumulation"):
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    engine = _one_rank_engine(config)
    _train(engine, range(1, 3))
    engine.save_checkpoint(str(tmp_path), tag="s0")
    assert sorted(p.name.split("_mp_rank")[0] for p in (tmp_path / "s0").glob("*optim_states.pt")) == partitions
    theta = {name: tensor.detach().float() for name, tensor in engine.module.state_dict().items()}
    exported = export_fp32_state_dict(str(tmp_path), tag="s0")
    assert all(tensor.dtype == torch.float32 for tensor in exported.values())
    assert max_abs_diff(exported, theta) == 0


def test_export_of_an_unreadable_checkpoint_is_a_one_line_error(tmp_path):
    from ds_orthoadam.export import ExportError, export_checkpoint

    _one_rank_engine(ds_config(stage=1)).save_checkpoint(str(tmp_path), tag="t")
    next((tmp_path / "t").glob("*optim_states.pt")).unlink()  # a copy that lost a shard
    with pytest.raises(ExportError, match=r"^checkpoint .*t could not be read \(FileNotFoundError: [^\n]*$"):
        export_checkpoint(tmp_path, "t", tiny_model("llama").config, tokenizer=None, out_dir=tmp_path / "hf")


# ------------------------------------------------------------------------------------------- config errors


def _orthoadam_config(**params) -> dict:
    config = ds_config(stage=1)
    config["optimizer"]["params"].update(params)
    return config


def test_orthoadam_translates_to_deepspeed_adamw_and_other_names_pass_through():
    translated, spec = resolve_config(_orthoadam_config(rotation="hadamard", seed=7))
    assert translated["optimizer"]["type"] == "AdamW" and "rotation" not in translated["optimizer"]["params"]
    assert (spec.rotation, spec.seed) == ("hadamard", 7)
    assert spec.max_rotated_dim == 16384
    assert resolve_config(_orthoadam_config(max_rotated_dim=None))[1].max_rotated_dim is None
    for name in ("AdamW", "Lamb", "SGD"):
        config = {**ds_config(stage=1), "optimizer": {"type": name, "params": {"lr": 0.1}}}
        assert resolve_config(config) == (config, None)


@pytest.mark.parametrize("config, field", [
    ({"optimizer": {"type": "OrthoAdamm"}}, "optimizer.type"),
    (_orthoadam_config(lr="fast"), "optimizer.params.lr"),
    (_orthoadam_config(betas=0.9), "optimizer.params.betas"),
    (_orthoadam_config(seed=1.5), "optimizer.params.seed"),
    (_orthoadam_config(rotation="permutation"), "optimizer.params.rotation"),
    (_orthoadam_config(long_axis="skip"), "optimizer.params.long_axis"),
    (_orthoadam_config(max_rotated_dim=0), "optimizer.params.max_rotated_dim"),
    (_orthoadam_config(max_rotated_dim="all"), "optimizer.params.max_rotated_dim"),
    (_orthoadam_config(momentum=0.9), "optimizer.params.momentum"),
    ({**_orthoadam_config(), "zero_optimization": {"stage": 4}}, "zero_optimization.stage"),
    ({**_orthoadam_config(), "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}},
     "zero_optimization.zero_hpz_partition_size"),
    ({**_orthoadam_config(), "zero_optimization": {"stage": 3, "zero_quantized_weights": True}},
     "zero_optimization.zero_quantized_weights"),
    ({**_orthoadam_config(), "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
     "zero_optimization.offload_param"),
    ({**_orthoadam_config(), "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}},
     "zero_optimization.offload_optimizer"),
    ({**_orthoadam_config(), "managed_gradient_accumulation": False}, "managed_gradient_accumulation"),
])
def test_config_errors_name_the_field(config, field):
    with pytest.raises(DeepSpeedConfigError, match=field.replace(".", r"\.")):
        resolve_config(config)


# ------------------------------------------------------------------- checkpoint guards (one rank, in process)


def _one_rank_engine(config: dict, accumulation: int = 1):
    init_single_rank_process_group()
    model = tiny_model("llama")
    config = {**config, "gradient_accumulation_steps": accumulation}
    engine, *_ = ds_orthoadam.initialize(model=model, model_parameters=model.parameters(), config=config)
    engine.backward(loss_of(engine, micro_batch(0, 0, 0)))
    engine.step()
    return engine


def test_the_frame_names_the_axes_it_leaves_unrotated():
    """max_rotated_dim=100 on the tiny llama (vocabulary 256, attention 128, MLP 160, hidden 64): every axis over
    100, found here from the parameters' shapes, is named; by default every axis of it is rotated."""
    limited = _hadamard_engine(max_rotated_dim=100).orthoadam_frame
    expected = [(name, f"dim {dim}", size) for name, p in limited.params.items() for dim, size in enumerate(p.shape)
                if size > 100]
    assert len(expected) == 2 + 7 * 2 and limited.unrotated_axes() == expected
    assert limited.summary().startswith("OrthoAdam rotations: hadamard, seed 1234, scheme version 2, ")
    name, dims, size = expected[0]
    assert f"left unrotated (max_rotated_dim=100, long_axis=hadamard): {name} {dims} ({size}), " in limited.summary()
    assert limited.summary().endswith(" and 12 more")
    assert _hadamard_engine().orthoadam_frame.summary().endswith("; every axis rotated")


def test_zero3_module_only_load_is_refused_before_anything_is_loaded(tmp_path):
    engine = _one_rank_engine(ds_config(stage=3))
    engine.save_checkpoint(str(tmp_path), tag="t")
    for kwargs in ({"load_module_only": True}, {"load_optimizer_states": False}):
        with pytest.raises(RotationMismatchError, match="under ZeRO-3: load the full checkpoint"):
            engine.load_checkpoint(str(tmp_path), tag="t", **kwargs)


def test_per_micro_batch_rotation_with_accumulation_is_announced(recwarn):
    _one_rank_engine(ds_config(stage=1), accumulation=2)
    _one_rank_engine({**ds_config(stage=1), "zero_optimization": {"stage": 1, "overlap_comm": True}}, accumulation=2)
    assert not [w for w in recwarn if "micro-batches' gradients" in str(w.message)]
    with pytest.warns(UserWarning, match="rotates each of the 2 micro-batches' gradients per optimiser step"):
        _one_rank_engine(ds_config(stage=2), accumulation=2)


def test_loading_with_other_rotations_or_a_plain_checkpoint_fails_clearly(tmp_path):
    _one_rank_engine(ds_config(stage=1)).save_checkpoint(str(tmp_path / "ortho"), tag="t")
    other_seed = ds_config(stage=1)
    other_seed["optimizer"]["params"]["seed"] += 1
    with pytest.raises(RotationMismatchError, match="seed"):
        _one_rank_engine(other_seed).load_checkpoint(str(tmp_path / "ortho"), tag="t")
    identity_long_axes = ds_config(stage=1)
    identity_long_axes["optimizer"]["params"].update(long_axis="identity", max_dense_dim=16)
    with pytest.raises(RotationMismatchError, match="'long_axis': 'identity'"):
        _one_rank_engine(identity_long_axes).load_checkpoint(str(tmp_path / "ortho"), tag="t")
    plain = _one_rank_engine(ds_config(stage=1, optimizer="AdamW"))
    plain.save_checkpoint(str(tmp_path / "plain"), tag="t")
    with pytest.raises(RotationMismatchError, match="load_module_only=True"):
        _one_rank_engine(ds_config(stage=1)).load_checkpoint(str(tmp_path / "plain"), tag="t")


def _hadamard_engine(version: int | None = None, **rotation_params):
    """A one-rank Hadamard OrthoAdam engine (the llama MLP axis, 160 = 5 * 32, has an odd block); ``version``
    rebuilds its frame with that rotation scheme before any step, as a run started with that release would be."""
    config = ds_config(stage=1)
    config["optimizer"]["params"].update(rotation="hadamard", **rotation_params)
    init_single_rank_process_group()
    model = tiny_model("llama")
    engine, *_ = ds_orthoadam.initialize(model=model, model_parameters=model.parameters(), config=config)
    if version is not None:
        engine.orthoadam_frame.adopt(dataclasses.replace(engine.orthoadam_frame.spec, version=version))
        engine.orthoadam_hooks._set_master_from_module()
    return engine


def _train(engine, steps: range) -> None:
    for step in steps:
        engine.backward(loss_of(engine, micro_batch(step, 0, 0)))
        engine.step()


def assert_resumes_like_the_writer_and_exports_real_weights(writer, resumed, checkpoint_dir, tag: str) -> None:
    """Two more steps of the writer (which saved ``tag`` after step 2) and of the engine resumed from it agree bit for
    bit, and the export of ``tag`` gives the module weights the writer had when it saved."""
    _train(writer, range(2, 4))
    _train(resumed, range(2, 4))
    for (name, param), (_, expected) in zip(resumed.module.named_parameters(), writer.module.named_parameters()):
        assert torch.equal(param, expected), name
    exported = export_fp32_state_dict(str(checkpoint_dir), tag=tag)
    writer_at_save = _hadamard_engine()
    writer_at_save.load_checkpoint(str(checkpoint_dir), tag=tag, load_module_only=True)
    for name, param in writer_at_save.module.named_parameters():
        torch.testing.assert_close(exported[name], param.detach(), rtol=0, atol=1e-6)


def test_a_checkpoint_from_rotation_scheme_1_goes_on_in_its_frame(tmp_path):
    writer = _hadamard_engine(version=1)
    _train(writer, range(2))
    writer.save_checkpoint(str(tmp_path), tag="v1")
    resumed = _hadamard_engine()
    assert resumed.orthoadam_frame.spec.version == 2
    with pytest.warns(RuntimeWarning, match="rotation scheme version 1: this run goes on with it"):
        resumed.load_checkpoint(str(tmp_path), tag="v1")
    assert resumed.orthoadam_frame.spec.version == 1
    # The export regenerates version 1's rotations from the checkpoint's record.
    assert_resumes_like_the_writer_and_exports_real_weights(writer, resumed, tmp_path, "v1")
    # Control: version 2's frame differs (the MLP matrices' odd block), so a resume in it would not match.
    version_2 = _hadamard_engine().orthoadam_frame.rotations
    x = torch.randn(160, 64)
    assert (resumed.orthoadam_frame.rotations["model.layers.0.mlp.up_proj.weight"].rotate(x)
            - version_2["model.layers.0.mlp.up_proj.weight"].rotate(x)).abs().max() > 1e-3


def test_a_checkpoint_from_before_max_rotated_dim_goes_on_rotating_every_axis(tmp_path):
    writer = _hadamard_engine(max_rotated_dim=None)
    _train(writer, range(2))
    writer.save_checkpoint(str(tmp_path), tag="old")
    # As a release before max_rotated_dim wrote it: the rotation record has no such field.
    states_file = next((tmp_path / "old").glob("*model_states.pt"))
    states = torch.load(states_file, weights_only=False)
    del states[ROTATION_STATE_KEY]["max_rotated_dim"]
    torch.save(states, states_file)
    resumed = _hadamard_engine(max_rotated_dim=100)  # would leave every axis but the 64-wide hidden one unrotated
    with pytest.warns(RuntimeWarning, match="written before max_rotated_dim existed, with every axis rotated"):
        resumed.load_checkpoint(str(tmp_path), tag="old")
    assert resumed.orthoadam_frame.spec.max_rotated_dim is None
    assert_resumes_like_the_writer_and_exports_real_weights(writer, resumed, tmp_path, "old")
    # A checkpoint that records max_rotated_dim is held to it like to any other rotation setting.
    writer.save_checkpoint(str(tmp_path), tag="new")
    with pytest.raises(RotationMismatchError, match="'max_rotated_dim': None"):
        _hadamard_engine(max_rotated_dim=100).load_checkpoint(str(tmp_path), tag="new")


def test_a_checkpoint_from_an_unknown_rotation_scheme_fails_clearly(tmp_path):
    writer = _hadamard_engine()
    writer.orthoadam_frame.spec = dataclasses.replace(writer.orthoadam_frame.spec, version=3)  # only recorded
    writer.save_checkpoint(str(tmp_path), tag="v3")
    with pytest.raises(RotationMismatchError, match=r"rotation scheme version 3 is not one this ds_orthoadam builds"):
        _hadamard_engine().load_checkpoint(str(tmp_path), tag="v3")
    with pytest.raises(RotationMismatchError, match=r"rotation scheme version 3 is not one"):
        export_fp32_state_dict(str(tmp_path), tag="v3")


@pytest.mark.parametrize("writer_params", [None, {"seed": SEED + 1}, {"max_rotated_dim": None}])
@pytest.mark.parametrize("how", [{"load_module_only": True}, {"load_optimizer_states": False}])
def test_module_only_load_starts_orthoadam_from_real_weights(tmp_path, writer_params, how):
    """From a plain AdamW checkpoint (None) or one with other rotations: only its real weights are taken, and the
    master is this engine's own frame applied to them."""
    writer_config = ds_config(stage=1, optimizer="AdamW" if writer_params is None else "OrthoAdam")
    writer_config["optimizer"]["params"].update(writer_params or {})
    writer = _one_rank_engine(writer_config)
    writer.save_checkpoint(str(tmp_path), tag="t")
    engine = _one_rank_engine(ds_config(stage=1))
    spec = engine.orthoadam_frame.spec
    engine.load_checkpoint(str(tmp_path), tag="t", **how)
    assert engine.orthoadam_frame.spec == spec
    for (name, param), (_, saved) in zip(engine.module.named_parameters(), writer.module.named_parameters()):
        assert torch.equal(param, saved), name
        rotation = engine.orthoadam_frame.rotations[name]
        assert torch.allclose(safe_get_full_fp32_param(param), rotation.rotate(saved.detach()), atol=1e-6), name
