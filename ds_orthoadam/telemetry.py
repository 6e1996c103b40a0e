"""What a run reports while it trains: TensorBoard scalars (through DeepSpeed's monitor) and rank-0 progress lines.

TensorBoard tags (all keyed by optimiser step; DeepSpeed itself adds ``Train/Samples/lr`` keyed by samples, and
``Train/Samples/loss_scale`` with fp16):

* ``Train/loss``, ``Train/lr``, ``Train/grad_norm`` (global 2-norm before clipping)
* ``Train/loss_scale``, ``Train/skipped_steps`` (fp16 only: dynamic loss scale, overflow-skipped steps so far)
* ``Perf/tokens_per_s``, ``Perf/tflops`` (achieved, all ranks together), ``Perf/mfu``
* ``Val/loss``, ``Val/ppl``
* ``Outliers/<metric>``: ``ds_orthoadam.analysis.metrics.outlier_metrics`` on a fixed probe batch every K steps
  (first-token attention share, hidden-state kurtosis first token / rest, max |activation| first token / rest, per
  layer and averaged).

FLOPs per trained token (PaLM, Chowdhery et al. 2022, appendix B): ``6 N + 12 L d T``, where N counts the weights of
every matrix multiply (all parameters except the token and position embedding tables, plus the output projection,
counted once even when tied to the embedding), L the layers, d the hidden size and T the sequence length (the second
term is the attention score and value products, forward + backward, without discounting the causal mask).
MFU = achieved FLOP/s / (peak FLOP/s per device x devices); the peak is the ``--peak-tflops`` option (default
125 TFLOP/s: V100 SXM2 fp16 tensor cores).
"""
from __future__ import annotations

import json
import math
import time
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from ds_orthoadam.analysis.metrics import outlier_metrics

TRAIN_TAGS = ("Train/loss", "Train/lr", "Train/grad_norm", "Perf/tokens_per_s", "Perf/tflops", "Perf/mfu")
FP16_TAGS = ("Train/loss_scale", "Train/skipped_steps")
VALIDATION_TAGS = ("Val/loss", "Val/ppl")
OUTLIER_PREFIX = "Outliers/"
HEADLINE_OUTLIER_METRICS = ("first_token_share", "kurtosis_first", "kurtosis_rest", "max_abs_first", "max_abs_rest")


def matmul_parameters(model: nn.Module) -> int:
    """N of the FLOP formula: parameters that take part in a matrix multiply, the output projection counted once."""
    embedding_ids = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    output = model.get_output_embeddings()
    output_ids = {id(output.weight)} if output is not None else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in embedding_ids or id(p) in output_ids)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token, ``6 N + 12 L d T`` (see the module docstring)."""
    config = model.config
    return 6.0 * matmul_parameters(model) + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


def format_duration(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0.0))))


class Telemetry:
    """Writes the run's scalars on rank 0: TensorBoard via ``engine.monitor``, progress lines, ``metrics.jsonl``.

    ``metrics.jsonl`` holds one JSON object per line: every step's loss, and every scalar written to TensorBoard,
    for scripts (the demo summary, tests) that should not parse event files.
    """

    def __init__(self, engine, *, tokens_per_step: int, flops_per_token: float, peak_tflops: float,
                 world_size: int, total_steps: int, rank: int, metrics_file: Path) -> None:
        self.engine = engine
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_tflops * 1e12 * world_size
        self.total_steps = total_steps
        self.is_rank0 = rank == 0
        self.metrics_file = metrics_file
        self._window_start = time.perf_counter()
        self._window_steps = 0

    def print(self, message: str) -> None:
        """Print once per run (rank 0), flushed so that launcher logs interleave correctly."""
        if self.is_rank0:
            print(message, flush=True)

    def _write(self, step: int, scalars: dict[str, float]) -> None:
        self.engine.monitor.write_events([(tag, value, step) for tag, value in scalars.items()])  # rank 0 only
        if self.is_rank0:
            with open(self.metrics_file, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **scalars}) + "\n")

    def train_step(self, step: int, loss: float, log: bool) -> dict[str, float]:
        """Record optimiser step ``step`` (1-based) with its rank-averaged ``loss``; print a line when ``log``."""
        self._window_steps += 1
        if not log:
            self._write(step, {"Train/loss": loss})  # the loss every step; the rest at log steps
            return {}
        now = time.perf_counter()
        seconds_per_step = (now - self._window_start) / self._window_steps
        tokens_per_s = self.tokens_per_step / seconds_per_step
        achieved = tokens_per_s * self.flops_per_token
        scalars = {
            "Train/loss": loss,
            "Train/lr": self.engine.get_lr()[0],
            "Train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "Perf/tokens_per_s": tokens_per_s,
            "Perf/tflops": achieved / 1e12,
            "Perf/mfu": achieved / self.peak_flops,
        }
        if self.engine.fp16_enabled():
            scalars["Train/loss_scale"] = float(self.engine.optimizer.loss_scale)
            scalars["Train/skipped_steps"] = float(self.engine.skipped_steps)
        self._write(step, scalars)
        eta = format_duration(seconds_per_step * (self.total_steps - step))
        fp16 = (f" | scale {scalars['Train/loss_scale']:.0f} skipped {self.engine.skipped_steps}"
                if "Train/loss_scale" in scalars else "")
        self.print(f"step {step:>6}/{self.total_steps} | loss {loss:.4f} | lr {scalars['Train/lr']:.2e} | "
                   f"grad norm {scalars['Train/grad_norm']:.3f} | {tokens_per_s:,.0f} tok/s | "
                   f"{achieved / 1e12:.2f} TFLOP/s (MFU {100 * scalars['Perf/mfu']:.1f}%){fp16} | "
                   f"ETA {eta}")
        self._window_start, self._window_steps = now, 0
        return scalars

    def exclude_pause(self, seconds: float) -> None:
        """Do not count ``seconds`` spent outside training steps (evaluation, checkpoints) in tokens/s."""
        self._window_start += seconds

    def validation(self, step: int, loss: float) -> dict[str, float]:
        scalars = {"Val/loss": loss, "Val/ppl": math.exp(min(loss, 50.0))}
        self._write(step, scalars)
        self.print(f"step {step:>6}/{self.total_steps} | validation loss {loss:.4f} | "
                   f"perplexity {scalars['Val/ppl']:.2f}")
        return scalars

    def outliers(self, step: int, model: nn.Module, probe_ids: torch.Tensor) -> dict[str, float]:
        """Outlier telemetry on the fixed probe batch (rank 0 only; other ranks go on to the next collective)."""
        if not self.is_rank0:
            return {}
        metrics = outlier_metrics(model, probe_ids)  # restores train mode and attention implementation itself
        self._write(step, {OUTLIER_PREFIX + name: float(value) for name, value in metrics.items()})
        headline = ", ".join(f"{name} {metrics[name]:.3g}" for name in HEADLINE_OUTLIER_METRICS)
        self.print(f"step {step:>6}/{self.total_steps} | outliers: {headline}")
        return metrics
