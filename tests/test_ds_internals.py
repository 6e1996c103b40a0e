"""The DeepSpeed behaviour ds_orthoadam/ds_internals.py relies on, checked against the installed DeepSpeed.

If one of these fails after a DeepSpeed upgrade, OrthoAdam under DeepSpeed would train in the wrong frame: fix
ds_internals.py (and nothing else) before using the new version. Runs on one rank in this process (plain DeepSpeed
AdamW, no ds_orthoadam wrapping), so each check isolates one fact.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import deepspeed
import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

from ds_orthoadam import ds_internals
from zero_harness import VOCAB, init_single_rank_process_group, loss_of, micro_batch, tiny_model


def _config(stage: int, bf16: bool = False, accumulation: int = 1, **extra) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": accumulation, "gradient_clipping": 0.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}, "steps_per_print": 10**9, **extra}


@pytest.fixture(scope="module", autouse=True)
def single_rank_process_group():
    init_single_rank_process_group()


def _engine(stage: int, bf16: bool = False, accumulation: int = 1, checkpointing: dict | None = None, **extra):
    """A one-rank engine of plain DeepSpeed; ``checkpointing``: activation checkpointing's kwargs, enabled before
    ``initialize`` (as the trainer does)."""
    model = tiny_model("llama")
    if checkpointing is not None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    config = _config(stage, bf16, accumulation, **extra)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def _master_values(engine) -> list[torch.Tensor]:
    """The fp32 master of every module parameter (ZeRO: assembled from partitions; stage 0: the wrapper's copies)."""
    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() >= 1:
        return [safe_get_full_fp32_param(p) for p in params]
    copies = [p for group in ds_internals.inner_optimizer(engine).param_groups for p in group["params"]]
    assert [c.shape for c in copies] == [p.shape for p in params]
    return copies


def _train_step(engine, step: int = 0, scale: float = 1.0) -> None:
    engine.backward(loss_of(engine, micro_batch(step, 0, 0)) * scale)
    engine.step()


@pytest.mark.parametrize("stage, bf16", [(1, False), (2, False), (1, True), (0, True)])
def test_master_copy_is_written_back_into_module_after_step(stage, bf16):
    engine = _engine(stage, bf16)
    assert ds_internals.optimizer_keeps_master_copy(engine)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    with torch.no_grad():  # put the module out of sync with the master: the step must overwrite it
        for p in engine.module.parameters():
            p.add_(1.0)
    _train_step(engine)
    for (name, param), master in zip(engine.module.named_parameters(), _master_values(engine)):
        assert torch.equal(param.detach(), master.to(param.dtype)), name
        assert not torch.equal(param.detach(), before[name] + 1.0)


@pytest.mark.parametrize("stage, bf16", [(1, False), (2, True), (0, True)])
def test_full_load_restores_module_and_master_each_from_its_own_copy(tmp_path, stage, bf16):
    engine = _engine(stage, bf16)
    _train_step(engine)
    with torch.no_grad():  # make the module differ from the master, as under OrthoAdam (theta vs phi)
        for p in engine.module.parameters():
            p.mul_(-1.0)
    saved_module = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    saved_master = [m.detach().clone() for m in _master_values(engine)]
    engine.save_checkpoint(str(tmp_path), tag="t")
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(0.5)
        ds_internals.copy_module_params_into_master(engine)
        for (name, p), master in zip(engine.module.named_parameters(), _master_values(engine)):
            assert torch.equal(master.to(p.dtype), p.detach()), name
    engine.load_checkpoint(str(tmp_path), tag="t")
    for (name, p), master, saved in zip(engine.module.named_parameters(), _master_values(engine), saved_master):
        assert torch.equal(master, saved), name
        assert torch.equal(p.detach(), saved_module[name]), name


def test_plain_fp32_stage0_steps_module_parameters_in_place():
    engine = _engine(0)
    assert not ds_internals.optimizer_keeps_master_copy(engine)
    stepped = {id(p) for group in ds_internals.inner_optimizer(engine).param_groups for p in group["params"]}
    assert stepped == {id(p) for p in engine.module.parameters()}


def test_copy_module_params_into_master_and_inner_optimizer_holds_flat_partition():
    engine = _engine(1)
    with torch.no_grad():
        for p in engine.module.parameters():
            p.mul_(-2.0)
    ds_internals.copy_module_params_into_master(engine)
    for param in engine.module.parameters():
        assert torch.equal(safe_get_full_fp32_param(param), param.detach())
    inner = ds_internals.inner_optimizer(engine)
    assert isinstance(inner, torch.optim.AdamW)
    flat = [p for group in inner.param_groups for p in group["params"]]
    assert len(flat) == 1 and flat[0].numel() >= sum(p.numel() for p in engine.module.parameters())


def test_overflow_step_is_skipped_and_reported():
    engine = _engine(1)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    _train_step(engine, scale=float("inf"))
    assert not engine.was_step_applied() and engine.skipped_steps == 1
    assert all(torch.equal(p.detach(), before[n]) for n, p in engine.module.named_parameters())
    _train_step(engine)
    assert engine.was_step_applied()


def test_optimizer_names_and_checkpoint_client_state(tmp_path):
    assert ds_internals.optimizer_name_resolvable("AdamW") and ds_internals.optimizer_name_resolvable("lamb")
    assert ds_internals.optimizer_name_resolvable("SGD") and not ds_internals.optimizer_name_resolvable("OrthoAdam")
    engine = _engine(1)
    engine.save_checkpoint(str(tmp_path), tag="t", client_state={"marker": 42})
    assert ds_internals.checkpoint_client_state(str(tmp_path), None)["marker"] == 42


@pytest.mark.parametrize("bf16", [False, True])
def test_only_stage0_keeps_the_optimizer_state_in_the_model_states_file(tmp_path, bf16):
    """Fact 5, what the weight export relies on: stage 0 writes no ``*_optim_states.pt`` (zero_to_fp32 has nothing to
    read); ZeRO-1 does, and a ZeRO-1 checkpoint that lost them must not pass for stage 0."""
    for stage in (0, 1):
        engine, directory = _engine(stage, bf16), str(tmp_path / str(stage))
        _train_step(engine)
        engine.save_checkpoint(directory, tag="t")
        saved = ds_internals.checkpoint_client_state(directory, "t")
        assert ds_internals.weights_only_in_model_states(directory, "t", saved) == (stage == 0)
        partitions = list((tmp_path / str(stage) / "t").glob("*_optim_states.pt"))
        assert bool(partitions) == (stage == 1)
    for partition in partitions:  # the ZeRO-1 checkpoint's
        partition.unlink()
    assert not ds_internals.weights_only_in_model_states(directory, "t", saved)


def _local_accumulated_grads(bf16: bool, step: int, accumulation: int) -> list[torch.Tensor]:
    """sum over micro-batches of grad(loss / accumulation), by plain autograd on the same model (no DeepSpeed)."""
    model = tiny_model("llama").to(torch.bfloat16 if bf16 else torch.float32)
    for micro in range(accumulation):
        (loss_of(model, micro_batch(step, micro, 0)) / accumulation).backward()
    return [p.grad for p in model.parameters()]


def _step_on_loss_and_negated_loss(engine, negated_loss, step: int, accumulation: int) -> None:
    """One optimiser step of ``engine`` on the loss and of ``negated_loss`` on its negation, micro-batch by
    micro-batch."""
    for micro in range(accumulation):
        engine.backward(loss_of(engine, micro_batch(step, micro, 0)))
        negated_loss.backward(-loss_of(negated_loss, micro_batch(step, micro, 0)))
        engine.step()
        negated_loss.step()


@pytest.mark.parametrize("stage, bf16", [(0, False), (0, True), (1, False), (1, True)])
def test_accumulated_grads_are_reduced_once_at_the_boundary_after_the_callback(stage, bf16):
    """Where reduces_accumulated_grads_at_boundary holds, the callback runs once per optimiser step, on the boundary
    micro-batch, sees the whole step's local gradient in p.grad, and DeepSpeed steps with what it leaves there:
    negating p.grad in the callback equals training on the negated loss. (One step; parameters change, so the
    second step checks again from a moved model.)"""
    accumulation = 2
    engine = _engine(stage, bf16, accumulation)
    negated_loss = _engine(stage, bf16, accumulation)
    assert ds_internals.reduces_accumulated_grads_at_boundary(engine)
    calls = []

    def negate_gradients():
        params = list(engine.module.parameters())
        calls.append((engine.micro_steps % accumulation, [p.grad.clone() for p in params]))
        for p in params:
            p.grad.neg_()

    ds_internals.run_before_boundary_reduction(engine, negate_gradients)
    for step in range(2):
        _step_on_loss_and_negated_loss(engine, negated_loss, step, accumulation)
        assert [m for m, _ in calls] == [accumulation - 1] * (step + 1)
        if step == 0:  # the plain-autograd reference starts from the initial weights
            for seen, expected in zip(calls[0][1], _local_accumulated_grads(bf16, step, accumulation)):
                # fp32: identical (measured 0); bf16: rounding (measured <= 0.009); a missing micro-batch: ~0.7.
                error = ((seen.float() - expected.float()).norm() / expected.float().norm()).item()
                assert error <= (0.05 if bf16 else 1e-6)
        for p, q in zip(engine.module.parameters(), negated_loss.module.parameters()):
            assert torch.equal(p, q)


@pytest.mark.parametrize("stage, bf16, extra, in_boundary_backward", [
    (1, False, {"zero_optimization": {"stage": 1, "overlap_comm": True}}, True),  # boundary reduced in its backward
    (2, False, {}, False),  # every micro-batch reduced and partitioned during its backward
    (1, True, {"data_types": {"grad_accum_dtype": "fp32"}}, False),  # BF16_Optimizer: fp32 buffers every backward
])
def test_configs_that_take_gradients_during_backward_are_not_reduced_at_the_boundary(stage, bf16, extra,
                                                                                     in_boundary_backward):
    """These need tensor hooks (a wrong True for the first function would rotate too late)."""
    engine = _engine(stage, bf16, 2, **extra)
    assert not ds_internals.reduces_accumulated_grads_at_boundary(engine)
    assert ds_internals.reduces_accumulated_grads_in_boundary_backward(engine) is in_boundary_backward
    if stage == 1 and not bf16:  # the configs of the test above reduce in allreduce_gradients instead
        assert not ds_internals.reduces_accumulated_grads_in_boundary_backward(_engine(stage, bf16, 2))


def test_zero1_overlap_comm_reduces_what_a_boundary_tensor_hook_returns_for_the_whole_step():
    """At ZeRO-1 with overlap_comm, p.grad holds the earlier micro-batches' local sum when a tensor hook runs on the
    boundary micro-batch, and what that hook returns (with p.grad cleared) is exactly what DeepSpeed reduces and
    steps: negating the whole-step sum there equals training on the negated loss."""
    accumulation, overlap = 2, {"zero_optimization": {"stage": 1, "overlap_comm": True}}
    engine, negated_loss = (_engine(1, False, accumulation, **overlap) for _ in range(2))
    assert ds_internals.reduces_accumulated_grads_in_boundary_backward(engine)
    seen_sums: dict[str, torch.Tensor] = {}

    def negate_whole_step(name, param, grad):
        if not engine.is_gradient_accumulation_boundary():
            return grad
        total = grad if param.grad is None else param.grad + grad
        seen_sums.setdefault(name, total.clone())  # the first step's sums
        param.grad = None
        return -total

    for name, param in engine.module.named_parameters():
        param.register_hook(lambda grad, name=name, param=param: negate_whole_step(name, param, grad))
    for step in range(2):
        _step_on_loss_and_negated_loss(engine, negated_loss, step, accumulation)
        if step == 0:
            names = [name for name, _ in engine.module.named_parameters()]
            for name, reference in zip(names, _local_accumulated_grads(False, step, accumulation)):
                assert ((seen_sums[name] - reference).norm() / reference.norm()).item() <= 1e-6, name
        for p, q in zip(engine.module.parameters(), negated_loss.module.parameters()):
            assert torch.equal(p, q)


def test_tensorboard_purge_hides_a_crashed_process_events_from_the_resume_step(tmp_path):
    """A crashed process logged steps 1..15; the resumed one (from step 10) purges from 11 and logs 11, 12 again.
    TensorBoard's EventAccumulator must then read every step once, 11 and 12 with the resumed values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tensorboard = {"enabled": True, "output_path": str(tmp_path), "job_name": "run"}
    crashed = _engine(0, tensorboard=tensorboard)
    crashed.monitor.write_events([("Train/loss", float(step), step) for step in range(1, 16)])  # flushed, not closed
    resumed = _engine(0, tensorboard=tensorboard)  # a new SummaryWriter (new event file) in the same directory
    assert ds_internals.purge_tensorboard_from_step(resumed, 11)
    resumed.monitor.write_events([("Train/loss", 100.0 + step, step) for step in (11, 12)])
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("Train/loss")] == (
        [(step, float(step)) for step in range(1, 11)] + [(11, 111.0), (12, 112.0)])
    assert not ds_internals.purge_tensorboard_from_step(_engine(0), 11)  # TensorBoard off: nothing to purge


def test_csv_monitor_layout_and_its_record_of_headers_written(tmp_path):
    """What telemetry.keep_csv_rows_through relies on: <output_path>/<job_name>/<tag with '_'>.csv, a header row the
    first time a process writes a tag, then step,value rows; a stem in the returned list suppresses the header."""
    csv_monitor = {"enabled": True, "output_path": str(tmp_path), "job_name": "run"}
    first = _engine(0, csv_monitor=csv_monitor)
    first.monitor.write_events([("Train/loss", 0.5, 1), ("Train/loss", 0.25, 2)])
    files, headed = ds_internals.csv_monitor_files(first)
    assert files == [tmp_path / "run" / "Train_loss.csv"] and headed == ["Train_loss"]
    assert files[0].read_text().splitlines() == ["step,loss", "1,0.5", "2,0.25"]
    second = _engine(0, csv_monitor=csv_monitor)  # a new process: it would write the header again...
    files, headed = ds_internals.csv_monitor_files(second)
    assert headed == []
    headed.append("Train_loss")  # ...unless told the file has one
    second.monitor.write_events([("Train/loss", 0.125, 3)])
    assert files[0].read_text().splitlines() == ["step,loss", "1,0.5", "2,0.25", "3,0.125"]
    assert ds_internals.csv_monitor_files(_engine(0)) is None  # monitor off


def test_the_shm_comm_op_skipped_at_start_up_is_one_deepspeed_knows():
    assert "deepspeed_shm_comm" in deepspeed.ops.__compatible_ops__
    ds_internals.skip_shm_comm_build()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False


# --------------------------------------------------------------------------------------------------------- ZeRO-3


def _zero3_engine(persistence_threshold: int = 0):
    """ZeRO-3 on one rank; threshold 0: every parameter is partitioned and gathered on use (none persistent)."""
    return _engine(3, zero_optimization={"stage": 3, "stage3_param_persistence_threshold": persistence_threshold})


def test_zero3_params_carry_their_whole_shape_and_every_gather_is_reported_before_use():
    """Each forward/backward fetch and GatheredParameters reports the whole, gathered weights; what the callback
    puts in param.data is what the module computes with: zeroing the final norm makes every logit 0, loss ln(V)."""
    engine, reference = _zero3_engine(), tiny_model("llama")
    params = dict(engine.module.named_parameters())
    expected = dict(reference.named_parameters())
    assert all(ds_internals.is_zero3_param(p) and p.numel() == 0 for p in params.values())
    assert {n: ds_internals.full_shape(p) for n, p in params.items()} == {n: p.shape for n, p in expected.items()}
    assert not ds_internals.is_zero3_param(expected["model.norm.weight"])
    names, seen = {id(p): n for n, p in params.items()}, []

    def after(param):
        seen.append((names[id(param)], param.data.clone()))
        if names[id(param)] == "model.norm.weight":
            param.data = torch.zeros_like(param.data)

    ds_internals.on_zero3_gather(params.values(), after)
    loss = loss_of(engine, micro_batch(0, 0, 0))
    assert loss.item() == pytest.approx(math.log(VOCAB), abs=1e-6)
    assert {name for name, _ in seen} == set(params)
    assert all(torch.equal(data, expected[name]) for name, data in seen)
    engine.backward(loss)
    seen.clear()
    with deepspeed.zero.GatheredParameters(list(params.values())):
        assert all(p.shape == expected[n].shape for n, p in params.items())
    assert sorted(name for name, _ in seen) == sorted(params)


def test_zero3_write_back_is_preceded_by_the_callback_and_the_master_refreshed_from_it():
    """rewrite_zero3_partitions: the partition and the fp32 master get what the write-back callback made of the
    gathered data (a new tensor, so not written through the one-rank gather's view of the partition); a
    GatheredParameters modifier's write-back for a whole list runs the callback for each parameter."""
    engine = _zero3_engine()
    params = list(engine.module.parameters())
    before = [safe_get_full_fp32_param(p).clone() for p in params]
    calls = []

    def double(param):
        calls.append(param)
        param.data = param.data * 2

    ds_internals.before_zero3_write_back(params, double)
    assert ds_internals.rewrite_zero3_partitions(engine, params) == []
    assert all(torch.equal(safe_get_full_fp32_param(p), 2 * b) for p, b in zip(params, before))
    with deepspeed.zero.GatheredParameters(params):
        assert all(torch.equal(p.data, 2 * b) for p, b in zip(params, before))
    calls.clear()
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        pass
    assert sorted(id(p) for p in calls) == sorted(id(p) for p in params)


def test_zero3_persistent_params_are_returned_by_the_rewrite_and_gathered_again():
    engine = _zero3_engine(persistence_threshold=10**9)  # every parameter of the tiny model is persistent:
    params = list(engine.module.parameters())
    _train_step(engine)  # gathered again at the end of every step, then never released
    assert all(p.numel() > 0 for p in params)
    were_gathered = ds_internals.rewrite_zero3_partitions(engine, params)
    assert [id(p) for p in were_gathered] == [id(p) for p in params] and all(p.numel() == 0 for p in params)
    ds_internals.gather_zero3_params(were_gathered)
    assert all(p.shape == ds_internals.full_shape(p) for p in params)


def test_zero3_reduces_the_gradient_a_tensor_hook_returns():
    engine, reference = _zero3_engine(), tiny_model("llama")
    assert ds_internals.zero3_reduces_after_tensor_hooks(engine)
    for param in engine.module.parameters():
        param.register_hook(lambda grad: -3 * grad)
    tokens = micro_batch(0, 0, 0)
    engine.backward(loss_of(engine, tokens))
    loss_of(reference, tokens).backward()
    for (name, param), expected in zip(engine.module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(safe_get_full_grad(param), -3 * expected.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_zero3_checkpoint_client_state(tmp_path):
    engine = _zero3_engine()
    engine.save_checkpoint(str(tmp_path), tag="t", client_state={"marker": 7})
    assert (tmp_path / "t" / ds_internals.ZERO3_MODEL_STATES).exists()
    assert ds_internals.checkpoint_client_state(str(tmp_path), "t")["marker"] == 7


@pytest.mark.parametrize("gpus_per_node, nodes", [(8, 1), (8, 4)])
def test_memory_estimates_are_what_deepspeeds_documented_estimators_print(capsys, gpus_per_node, nodes):
    """Fact 16: the bytes zero2_estimate / zero3_estimate return are the per-GPU figures (no offload; ZeRO-3 with
    zero.Init) that DeepSpeed's documented ``*_all_cold`` estimators print, in their GB (2^30) to two decimals."""
    import re

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    params, largest = 6_738_415_616, 131_072_000
    estimate_zero2_model_states_mem_needs_all_cold(params, gpus_per_node, nodes)
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.rstrip().endswith("offload_optimizer=none"))
    assert float(re.findall(r"([\d.]+)GB", row)[1]) == round(ds_internals.zero2_estimate(params, gpus_per_node, nodes)
                                                              / 2**30, 2)
    estimate_zero3_model_states_mem_needs_all_cold(params, largest, gpus_per_node, nodes)
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines()
               if "offload_param=none" in line and "offload_optimizer=none" in line and "zero_init=1" in line)
    assert float(re.findall(r"([\d.]+)GB", row)[1]) == round(
        ds_internals.zero3_estimate(params, largest, gpus_per_node, nodes) / 2**30, 2)


def test_zero3_save_checkpoint_gathers_nothing_and_writes_nothing_back(tmp_path):
    """Fact 17: the trainer's save (engine.save_checkpoint) neither gathers a parameter nor writes one back into its
    partition, so the partitions stay bit for bit what the step left; save_16bit_model (the consolidated 16-bit
    state dict) does both: the observers see it, so they would see a save that did."""
    engine = _engine(3, zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 0,
                                           "stage3_gather_16bit_weights_on_model_save": True})
    _train_step(engine)
    params = list(engine.module.parameters())
    partitions = [p.ds_tensor.clone() for p in params]
    gathered, written = [], []
    ds_internals.on_zero3_gather(params, gathered.append)
    ds_internals.before_zero3_write_back(params, written.append)
    engine.save_checkpoint(str(tmp_path), tag="t")
    assert gathered == [] and written == []
    assert all(torch.equal(p.ds_tensor, saved) for p, saved in zip(params, partitions))
    engine.save_16bit_model(str(tmp_path / "consolidated"))
    assert {id(p) for p in gathered} == {id(p) for p in params} and {id(p) for p in written} == {id(p) for p in params}


def _checkpointed_loss_and_grads(stage: int, kwargs: dict | None) -> tuple[float, list[torch.Tensor]]:
    engine = _engine(stage, checkpointing=kwargs)
    engine.module.train()
    loss = loss_of(engine, micro_batch(0, 0, 0))
    engine.backward(loss)
    return loss.item(), [safe_get_full_grad(p).clone() for p in engine.module.parameters()]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_reentrant_activation_checkpointing_gives_the_gradients_of_a_run_without(stage):
    """Fact 18, the working route: with ACTIVATION_CHECKPOINTING_KWARGS every stage computes the loss and gradients
    of the run without checkpointing (fp32, one rank: the recomputation repeats the same arithmetic; rtol 1e-6
    allows for another order of accumulating the gradients)."""
    loss, grads = _checkpointed_loss_and_grads(stage, None)
    checkpointed_loss, checkpointed = _checkpointed_loss_and_grads(stage, ds_internals.ACTIVATION_CHECKPOINTING_KWARGS)
    assert checkpointed_loss == loss
    for grad, expected in zip(checkpointed, grads):
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-8)


def test_non_reentrant_activation_checkpointing_fails_under_zero3():
    """Fact 18, the trap: transformers' default (non-reentrant) fails in the first backward of a process's first
    ZeRO-3 engine, which is what the trainer runs (in a process that had built a ZeRO-3 engine before, a later one
    got through: hence a fresh process)."""
    code = ("from zero_harness import init_single_rank_process_group; init_single_rank_process_group(); "
            "import test_ds_internals as t; t._checkpointed_loss_and_grads(3, {'use_reentrant': False})")
    tests_dir = Path(__file__).resolve().parent
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tests_dir.parent), str(tests_dir)])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "CheckpointError" in result.stderr and "different number of tensors" in result.stderr, result.stderr[-2000:]
