"""The live outlier telemetry of several runs against training step, in one figure: how the pathologies form (or do
not) while the models learn. Reads each run's ``metrics.jsonl`` (written by :mod:`ds_orthoadam.telemetry`)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

from ds_orthoadam.telemetry import OUTLIER_PREFIX, metric_series  # noqa: E402

# (title, y label, [(tag, line style, legend suffix)], log scale)
PANELS = (
    ("first-token attention mass", "mean weight on the first token",
     [(OUTLIER_PREFIX + "first_token_attention_mass", "-", "")], False),
    ("sink rate (heads with mean first-token weight > 0.3)", "share of heads",
     [(OUTLIER_PREFIX + "sink_rate", "-", "")], False),
    ("hidden-state kurtosis", "Pearson kurtosis (Gaussian 3)",
     [(OUTLIER_PREFIX + "kurtosis_first", "-", " first token"), (OUTLIER_PREFIX + "kurtosis_rest", "--", " rest")],
     True),
    ("max |activation|", "layer mean of max |X|",
     [(OUTLIER_PREFIX + "max_abs_first", "-", " first token"), (OUTLIER_PREFIX + "max_abs_rest", "--", " rest")],
     True),
    ("validation loss", "nats / token", [("Val/loss", "-", "")], False),
)


def plot_telemetry(runs: dict[str, Path], out: Path, title: str = "outlier telemetry during training") -> Path:
    """Draw every run's telemetry (label -> metrics.jsonl) into the PNG ``out``; returns ``out``.

    Solid lines are the first token, dashed the other tokens; one colour per run. A run without a tag (telemetry
    off, or not yet logged) simply has no line in that panel."""
    columns = math.ceil(len(PANELS) / 2)
    figure, axes = plt.subplots(2, columns, figsize=(5 * columns, 8), squeeze=False)
    for axis, (panel_title, ylabel, series, log) in zip(axes.flat, PANELS):
        for index, (label, metrics_file) in enumerate(runs.items()):
            for tag, style, suffix in series:
                steps, values = metric_series(metrics_file, tag) if metrics_file.exists() else ([], [])
                if steps:
                    axis.plot(steps, values, style, color=f"C{index}", label=label + suffix)
        axis.set_title(panel_title, fontsize=10)
        axis.set_xlabel("optimiser step")
        axis.set_ylabel(ylabel)
        if log:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    legend_axis = axes.flat[len(PANELS)] if len(PANELS) < axes.size else axes.flat[-1]
    handles = {line.get_label(): line for axis in axes.flat for line in axis.get_lines()}
    legend_axis.axis("off")
    legend_axis.legend(handles.values(), handles.keys(), loc="center", fontsize=9)
    figure.suptitle(title)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
