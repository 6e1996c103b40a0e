"""The DeepSpeed behaviour ds_orthoadam/ds_internals.py relies on, checked against the installed DeepSpeed.

If one of these fails after a DeepSpeed upgrade, OrthoAdam under DeepSpeed would train in the wrong frame: fix
ds_internals.py (and nothing else) before using the new version. Runs on one rank in this process (plain DeepSpeed
AdamW, no ds_orthoadam wrapping), so each check isolates one fact.
"""
from __future__ import annotations

import deepspeed
import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param

from ds_orthoadam import ds_internals
from zero_harness import init_single_rank_process_group, loss_of, micro_batch, tiny_model


def _config(stage: int, bf16: bool = False) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}, "steps_per_print": 10**9}


@pytest.fixture(scope="module", autouse=True)
def single_rank_process_group():
    init_single_rank_process_group()


def _engine(stage: int, bf16: bool = False):
    model = tiny_model("llama")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(stage, bf16))
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
