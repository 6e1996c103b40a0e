"""Telemetry: the per-device MFU peak, MFU on/off in a real engine's logged scalars, metrics.jsonl after a resume."""
from __future__ import annotations

import json

import deepspeed
import pytest
import torch

from ds_orthoadam.telemetry import MFU_TAG, Telemetry, keep_metrics_through, peak_tflops_for_device
from zero_harness import init_single_rank_process_group, loss_of, micro_batch, tiny_model


@pytest.mark.parametrize("device_name, tflops", [
    ("Tesla V100-SXM2-32GB", 125.0), ("Tesla V100-PCIE-16GB", 112.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA A10", 125.0),
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA L4", 121.0), ("NVIDIA GeForce RTX 4090", 165.2),
    # not listed: MFU is not reported rather than computed against a wrong peak
    ("cpu", None), ("NVIDIA A10G", None), ("Tesla V100S-PCIE-32GB", None), ("NVIDIA L40S", None),
    ("NVIDIA GeForce RTX 3090", None),
])
def test_peak_tflops_by_device_name(device_name, tflops):
    assert peak_tflops_for_device(device_name) == tflops


def test_mfu_only_with_a_peak(tmp_path, capsys):
    """No peak (the CPU default): no Perf/mfu scalar and no MFU in the progress line; a peak: MFU = TFLOP/s / peak."""
    init_single_rank_process_group()
    model = tiny_model("llama")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "steps_per_print": 10**9})
    for peak, metrics_file in ((None, tmp_path / "none.jsonl"), (2.5, tmp_path / "peak.jsonl")):
        telemetry = Telemetry(engine, tokens_per_step=64, flops_per_token=1e9, peak_tflops=peak, world_size=1,
                              total_steps=10, rank=0, metrics_file=metrics_file)
        capsys.readouterr()
        telemetry.before_optimizer_step()
        scalars = telemetry.train_step(1, 3.0, log=True)
        line = capsys.readouterr().out
        logged = json.loads(metrics_file.read_text())
        if peak is None:
            assert MFU_TAG not in scalars and MFU_TAG not in logged
            assert "TFLOP/s |" in line and "MFU" not in line
        else:
            assert logged[MFU_TAG] == pytest.approx(logged["Perf/tflops"] / peak)
            assert f"(MFU {100 * scalars[MFU_TAG]:.1f}%)" in line


@pytest.mark.parametrize("scheduler", [
    {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 4,
                                    "warmup_type": "linear"}},
    {"type": "WarmupCosineLR", "params": {"total_num_steps": 6, "warmup_num_steps": 2, "warmup_min_ratio": 0.1,
                                          "cos_min_ratio": 0.1, "warmup_type": "linear"}},  # as in ds_configs/
])
def test_lr_and_grad_norm_are_those_the_optimiser_step_used(tmp_path, scheduler):
    """fp32 ZeRO-0 (DeepSpeed reports no gradient norm there) with a schedule and plain SGD, whose update -lr * g
    shows the learning rate a step really applied: the log must give that step's, not the next one's."""
    init_single_rank_process_group()
    model = tiny_model("llama")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 1e-3}},
        "scheduler": scheduler, "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0,
        "steps_per_print": 10**9})
    telemetry = Telemetry(engine, tokens_per_step=64, flops_per_token=1e9, peak_tflops=None, world_size=1,
                          total_steps=10, rank=0, metrics_file=tmp_path / "metrics.jsonl")
    weight = engine.module.model.embed_tokens.weight
    applied = []
    for step in range(1, 4):
        engine.backward(loss_of(engine, micro_batch(step, 0, 0)))
        grads = [p.grad.clone() for p in engine.module.parameters() if p.grad is not None]
        before, grad = weight.detach().clone(), weight.grad.clone()
        telemetry.before_optimizer_step()
        engine.step()
        scalars = telemetry.train_step(step, 1.0, log=True)
        moved = grad.abs() > 1e-4
        applied.append(((before - weight.detach())[moved] / grad[moved]).mean().item())
        assert scalars["Train/lr"] == pytest.approx(applied[-1], rel=1e-3)
        assert scalars["Train/grad_norm"] == pytest.approx(torch.cat([g.flatten() for g in grads]).norm().item(),
                                                           rel=1e-5)
    assert applied[-1] > applied[0]  # the schedule moved: a log one step ahead would differ


def test_keep_metrics_through_drops_later_steps_and_a_torn_last_line(tmp_path, capsys):
    metrics_file = tmp_path / "metrics.jsonl"
    rows = [{"step": step, "Train/loss": 10.0 - step / 4} for step in range(1, 16)]
    rows.insert(5, {"step": 5, "Val/loss": 7.5})
    lines = [json.dumps(row) for row in rows]
    metrics_file.write_text("\n".join(lines) + "\n" + lines[-1][:9], encoding="utf-8")  # crash mid-write
    keep_metrics_through(metrics_file, 10)
    assert metrics_file.read_text(encoding="utf-8").splitlines() == [json.dumps(r) for r in rows if r["step"] <= 10]
    warning = capsys.readouterr().err
    assert str(metrics_file) in warning and "1 unparsable line" in warning and len(warning.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # the temporary file was renamed
    keep_metrics_through(metrics_file, 0)  # a fresh start in a directory left by a run without checkpoints
    assert metrics_file.read_text() == ""
    keep_metrics_through(tmp_path / "absent.jsonl", 3)  # nothing logged yet: nothing to do
    assert not (tmp_path / "absent.jsonl").exists()
