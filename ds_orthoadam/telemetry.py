"""What a run reports while it trains: TensorBoard scalars (through DeepSpeed's monitor) and rank-0 progress lines.

TensorBoard tags (all keyed by optimiser step; DeepSpeed itself adds ``Train/Samples/lr`` keyed by samples, and
``Train/Samples/loss_scale`` with fp16):

* ``Train/loss``, ``Train/lr``, ``Train/grad_norm`` (global 2-norm before clipping)
* ``Train/loss_scale``, ``Train/skipped_steps`` (fp16 only: dynamic loss scale, overflow-skipped steps so far)
* ``Perf/tokens_per_s``, ``Perf/tflops`` (achieved, all ranks together), ``Perf/mfu`` (only with a known peak)
* ``Val/loss``, ``Val/ppl``
* ``Outliers/<metric>``: ``ds_orthoadam.analysis.metrics.outlier_metrics`` on a fixed probe batch every K steps
  (first-token attention share and mass, sink rate (Gu et al.: share of heads whose mean first-token attention
  exceeds 0.3), hidden-state kurtosis first token / rest, max |activation| first token / rest, per layer and
  averaged). The headline ones (:data:`HEADLINE_OUTLIER_METRICS`) are printed too.

FLOPs per trained token (PaLM, Chowdhery et al. 2022, appendix B): ``6 N + 12 L d T``, where N counts the weights of
every matrix multiply (all parameters except the token and position embedding tables, plus the output projection,
counted once even when tied to the embedding), L the layers, d the hidden size and T the sequence length (the second
term is the attention score and value products, forward + backward, without discounting the causal mask).
MFU = achieved FLOP/s / (peak FLOP/s per device x devices). The peak is ``--peak-tflops`` or, without it, the dense
fp16/bf16 tensor-core peak of the detected GPU (:data:`PEAK_TFLOPS`); on a CPU or an unlisted GPU MFU is not reported.

Restarts: a resumed run starts at the checkpoint's step S, but the crashed process may have logged steps after S.
:meth:`Telemetry.start_at` drops those rows from ``metrics.jsonl`` and makes TensorBoard hide those events, so
every step appears once, with the values of the run that continued.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from ds_orthoadam import ds_internals
from ds_orthoadam.analysis.metrics import outlier_metrics
from ds_orthoadam.evaluation import perplexity

TRAIN_TAGS = ("Train/loss", "Train/lr", "Train/grad_norm", "Perf/tokens_per_s", "Perf/tflops")
MFU_TAG = "Perf/mfu"  # only with a known peak (see peak_tflops_for_device)
FP16_TAGS = ("Train/loss_scale", "Train/skipped_steps")
VALIDATION_TAGS = ("Val/loss", "Val/ppl")
OUTLIER_PREFIX = "Outliers/"
HEADLINE_OUTLIER_METRICS = ("first_token_share", "first_token_attention_mass", "sink_rate", "kurtosis_first",
                            "kurtosis_rest", "max_abs_first", "max_abs_rest")


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


# Dense (no 2:4 sparsity) fp16/bf16 tensor-core peak per device, TFLOP/s, from NVIDIA's datasheets (the sparse figure
# halved where only that is printed; RTX 4090: Ada whitepaper, fp32 accumulation). Keyed by the words of
# torch.cuda.get_device_name(), e.g. "Tesla V100-SXM2-32GB", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3";
# the first row whose words all occur wins, so a variant (PCIe, NVL) comes before its family.
PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("V100", "PCIE"), 112.0),
    (("V100",), 125.0),  # SXM2
    (("A100",), 312.0),
    (("A10",), 125.0),
    (("L4",), 121.0),
    (("H100", "NVL"), 835.0),
    (("H100", "PCIE"), 756.0),
    (("H100",), 989.0),  # SXM
    (("H200", "NVL"), 835.0),
    (("H200",), 989.0),
    (("RTX", "4090"), 165.2),
)


def peak_tflops_for_device(device_name: str) -> float | None:
    """The dense fp16/bf16 peak of a device named like ``torch.cuda.get_device_name()``; None when not listed.

    Matched by whole words, so an A10G or A100 is not taken for an A10, nor a V100S for a V100.
    """
    words = set(re.split(r"[^A-Z0-9]+", device_name.upper()))
    return next((tflops for model, tflops in PEAK_TFLOPS if words.issuperset(model)), None)


def _replace_atomically(path: Path, lines: list[str]) -> None:
    """Write ``lines`` to a temporary file beside ``path`` that then replaces it: a crash leaves the old file or the
    new one, never a truncated one."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.writelines(lines)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _metric_rows(metrics_file: Path) -> list[tuple[str, dict | None]]:
    """Every line of ``metrics_file`` with its row, or None where it is not a JSON object with an integer step
    (a line a crash left half-written)."""
    rows = []
    for line in metrics_file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        rows.append((line, row if isinstance(row, dict) and isinstance(row.get("step"), int) else None))
    return rows


def metric_series(metrics_file: Path, tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``tag`` in a run's ``metrics.jsonl``, in step order; unparsable lines are skipped."""
    points = sorted((row["step"], row[tag]) for _, row in _metric_rows(metrics_file) if row is not None and tag in row)
    return [step for step, _ in points], [value for _, value in points]


def keep_metrics_through(metrics_file: Path, last_step: int) -> None:
    """Rewrite ``metrics_file`` with only its rows of steps ``<= last_step``, atomically (rank 0).

    A crash can leave a half-written last line: unparsable lines are dropped with a warning rather than failing the
    resume.
    """
    if not metrics_file.exists():
        return
    rows = _metric_rows(metrics_file)
    kept = [line + "\n" for line, row in rows if row is not None and row["step"] <= last_step]
    unparsable = sum(row is None for _, row in rows)
    if unparsable:
        print(f"warning: dropped {unparsable} unparsable line(s) from {metrics_file} (left by a crash)",
              file=sys.stderr, flush=True)
    _replace_atomically(metrics_file, kept)


def keep_csv_rows_through(engine, last_step: int) -> None:
    """Rewrite DeepSpeed's csv monitor files with their header and the rows of steps ``<= last_step`` (rank 0; the
    same single threshold as the TensorBoard purge, so sample-keyed tags lose more), and tell the monitor that the
    headers are there. Rows a crash left half-written, and headers repeated by earlier processes, are dropped."""
    found = ds_internals.csv_monitor_files(engine)
    if found is None:
        return
    files, headed = found
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        newline = "\r\n" if "\r\n" in text else "\n"  # Python's csv writer ends rows with \r\n
        lines = text.splitlines()[:None if text.endswith("\n") else -1]  # a last line without newline is torn
        kept = [lines[0] + newline] if lines else []
        for line in lines[1:]:
            step = line.split(",", 1)[0]
            if step.isdigit() and int(step) <= last_step:
                kept.append(line + newline)
        _replace_atomically(path, kept)
        headed.append(path.stem)


def format_duration(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0.0))))


class Telemetry:
    """Writes the run's scalars on rank 0: TensorBoard via ``engine.monitor``, progress lines, ``metrics.jsonl``.

    ``metrics.jsonl`` holds one JSON object per line: every step's loss, and every scalar written to TensorBoard,
    for scripts (the demo summary, tests) that should not parse event files.
    """

    def __init__(self, engine, *, tokens_per_step: int, flops_per_token: float, peak_tflops: float | None,
                 world_size: int, total_steps: int, rank: int, metrics_file: Path,
                 collective_forward: bool = False) -> None:
        """``peak_tflops`` per device; None: MFU is not reported (no ``Perf/mfu``, no MFU in progress lines).
        ``collective_forward``: the module's parameters are partitioned (ZeRO-3), so every rank must join the
        outlier probe's forward (each gathers the parameters with all the others); rank 0 still reports alone."""
        self.engine = engine
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_tflops * 1e12 * world_size if peak_tflops is not None else None
        self.total_steps = total_steps
        self.is_rank0 = rank == 0
        self.collective_forward = collective_forward
        self.metrics_file = metrics_file
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._step_lr = math.nan
        self._module_grad_norm: float | None = None

    def print(self, message: str) -> None:
        """Print once per run (rank 0), flushed so that launcher logs interleave correctly."""
        if self.is_rank0:
            print(message, flush=True)

    def start_at(self, step: int) -> None:
        """Forget what an earlier process of this run logged after ``step``, the step training continues from.

        Call once before the first scalar is written, on every rank (0 for a fresh run: a directory left by a run
        that crashed before its first checkpoint starts clean). TensorBoard hides earlier events of every tag from
        step ``step + 1`` on, which includes DeepSpeed's sample-keyed ``Train/Samples/*`` points from sample
        ``step + 1`` on (see :func:`ds_internals.purge_tensorboard_from_step`).
        """
        if self.is_rank0:
            keep_metrics_through(self.metrics_file, step)
            keep_csv_rows_through(self.engine, step)
        ds_internals.purge_tensorboard_from_step(self.engine, step + 1)

    def logged(self, step: int, tag: str) -> bool:
        """Whether ``metrics.jsonl`` already holds ``tag`` at ``step`` (rank 0; False elsewhere)."""
        if not self.is_rank0 or not self.metrics_file.exists():
            return False
        return any(row is not None and row["step"] == step and tag in row for _, row in _metric_rows(self.metrics_file))

    def _write(self, step: int, scalars: dict[str, float]) -> None:
        self.engine.monitor.write_events([(tag, value, step) for tag, value in scalars.items()])  # rank 0 only
        if self.is_rank0:
            with open(self.metrics_file, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **scalars}) + "\n")

    def before_optimizer_step(self) -> None:
        """Call right before the ``engine.step()`` that steps the optimiser (the accumulation boundary) of a step
        that will be logged: what that step uses is readable only then. The learning rate (``engine.step()``
        advances the scheduler, so reading it afterwards gives the next step's) and the gradients' norm where they
        are still on the module's parameters (fp32 ZeRO-0, the one configuration in which DeepSpeed reports no
        norm; ZeRO-1/2 hold them elsewhere)."""
        self._step_lr = self.engine.get_lr()[0]
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        self._module_grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else None

    def _grad_norm(self) -> float:
        """The optimiser step's gradient norm before clipping: DeepSpeed's, else the module gradients' (NaN: none)."""
        reported = self.engine.get_global_grad_norm()
        if reported is not None:
            return float(reported)
        return self._module_grad_norm if self._module_grad_norm is not None else math.nan

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
            "Train/lr": self._step_lr,
            "Train/grad_norm": self._grad_norm(),
            "Perf/tokens_per_s": tokens_per_s,
            "Perf/tflops": achieved / 1e12,
        }
        if self.peak_flops is not None:
            scalars[MFU_TAG] = achieved / self.peak_flops
        if self.engine.fp16_enabled():
            scalars["Train/loss_scale"] = float(self.engine.optimizer.loss_scale)
            scalars["Train/skipped_steps"] = float(self.engine.skipped_steps)
        self._write(step, scalars)
        eta = format_duration(seconds_per_step * (self.total_steps - step))
        mfu = f" (MFU {100 * scalars[MFU_TAG]:.1f}%)" if MFU_TAG in scalars else ""
        fp16 = (f" | scale {scalars['Train/loss_scale']:.0f} skipped {self.engine.skipped_steps}"
                if "Train/loss_scale" in scalars else "")
        self.print(f"step {step:>6}/{self.total_steps} | loss {loss:.4f} | lr {scalars['Train/lr']:.2e} | "
                   f"grad norm {scalars['Train/grad_norm']:.3f} | {tokens_per_s:,.0f} tok/s | "
                   f"{achieved / 1e12:.2f} TFLOP/s{mfu}{fp16} | ETA {eta}")
        self._window_start, self._window_steps = now, 0
        return scalars

    def exclude_pause(self, seconds: float) -> None:
        """Do not count ``seconds`` spent outside training steps (evaluation, checkpoints) in tokens/s."""
        self._window_start += seconds

    def validation(self, step: int, loss: float) -> dict[str, float]:
        scalars = {"Val/loss": loss, "Val/ppl": perplexity(loss)}
        self._write(step, scalars)
        self.print(f"step {step:>6}/{self.total_steps} | validation loss {loss:.4f} | "
                   f"perplexity {scalars['Val/ppl']:.2f}")
        return scalars

    def outliers(self, step: int, model: nn.Module, probe_ids: torch.Tensor) -> dict[str, float]:
        """Outlier telemetry on the fixed probe batch, reported by rank 0. Without ``collective_forward`` only rank 0
        runs the probe and the other ranks go on to the next collective; with it, every rank runs the forward on its
        own probe batch (same shapes) and only rank 0's metrics are kept."""
        if not self.is_rank0 and not self.collective_forward:
            return {}
        metrics = outlier_metrics(model, probe_ids)  # restores train mode and attention implementation itself
        if not self.is_rank0:
            return {}
        self._write(step, {OUTLIER_PREFIX + name: float(value) for name, value in metrics.items()})
        headline = ", ".join(f"{name} {metrics[name]:.3g}" for name in HEADLINE_OUTLIER_METRICS)
        self.print(f"step {step:>6}/{self.total_steps} | outliers: {headline}")
        return metrics
