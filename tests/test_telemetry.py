"""Telemetry: the per-device MFU peak, MFU on/off in a real engine's logged scalars, metrics.jsonl after a resume,
outlier headline metrics in TensorBoard and the log, an overflow-safe validation perplexity."""
from __future__ import annotations

import json
import math

import deepspeed
import pytest
import torch

from ds_orthoadam.analysis import outlier_metrics
from ds_orthoadam.telemetry import (
    HEADLINE_OUTLIER_METRICS,
    MFU_TAG,
    OUTLIER_PREFIX,
    Telemetry,
    keep_metrics_through,
    peak_tflops_for_device,
)
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


def _adamw_engine(**config):
    """A single-rank DeepSpeed engine (AdamW) of the tiny llama; ``config`` adds sections (e.g. ``tensorboard``)."""
    init_single_rank_process_group()
    model = tiny_model("llama")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "steps_per_print": 10**9, **config})
    return engine


def test_mfu_only_with_a_peak(tmp_path, capsys):
    """No peak (the CPU default): no Perf/mfu scalar and no MFU in the progress line; a peak: MFU = TFLOP/s / peak."""
    engine = _adamw_engine()
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


def _tensorboard_scalars(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return events


def test_outlier_telemetry_writes_sink_rate_and_mass_to_tensorboard_and_prints_the_headline(tmp_path, capsys):
    engine = _adamw_engine(tensorboard={"enabled": True, "output_path": str(tmp_path / "tensorboard"),
                                        "job_name": "run"})
    telemetry = Telemetry(engine, tokens_per_step=64, flops_per_token=1e9, peak_tflops=None, world_size=1,
                          total_steps=10, rank=0, metrics_file=tmp_path / "metrics.jsonl")
    probe = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    capsys.readouterr()
    telemetry.outliers(5, engine.module, probe)
    line = capsys.readouterr().out
    engine.monitor.tb_monitor.summary_writer.flush()
    expected = outlier_metrics(engine.module, probe)  # the analyser on the same batch: a second call
    assert {"sink_rate", "first_token_attention_mass"} <= set(HEADLINE_OUTLIER_METRICS)
    for name in HEADLINE_OUTLIER_METRICS:
        assert f"{name} {expected[name]:.3g}" in line
    events = _tensorboard_scalars(tmp_path / "tensorboard" / "run")
    for name in ("sink_rate", "first_token_attention_mass", "layer_1/sink_rate"):
        [event] = events.Scalars(OUTLIER_PREFIX + name)
        assert (event.step, event.value) == (5, pytest.approx(expected[name], rel=1e-6))
    logged = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert logged["Outliers/sink_rate"] == pytest.approx(expected["sink_rate"])


@pytest.mark.parametrize("loss, ppl", [(2.0, math.exp(2.0)), (800.0, math.inf), (math.inf, math.inf)])
def test_validation_perplexity_of_a_diverged_loss_is_infinite_not_an_overflow(tmp_path, loss, ppl):
    telemetry = Telemetry(_adamw_engine(), tokens_per_step=64, flops_per_token=1e9, peak_tflops=None, world_size=1,
                          total_steps=10, rank=0, metrics_file=tmp_path / "metrics.jsonl")
    assert telemetry.validation(3, loss)["Val/ppl"] == pytest.approx(ppl)
    assert math.isnan(telemetry.validation(4, math.nan)["Val/ppl"])
