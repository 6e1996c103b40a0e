"""PNG plots comparing several analysed models (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from ds_orthoadam.analysis.metrics import DEFAULT_SINK_EPSILON, argmax_share_chance  # noqa: E402
from ds_orthoadam.analysis.report import weight_only_results  # noqa: E402
from ds_orthoadam.analysis.runner import SampleMaps  # noqa: E402

FULL_PRECISION_BITS = 16  # where full-precision perplexity sits on the bit-width axis


def _save(figure, out_dir: str, name: str) -> str:
    figure.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(figure)
    return name


def _draw_per_layer(axis, models: Sequence[dict], keys: Sequence[tuple[str, str]], ylabel: str, log: bool,
                    title: str) -> None:
    for index, entry in enumerate(models):
        colour = f"C{index}"
        for key, style in keys:
            values = np.asarray(entry["per_layer"][key], dtype=float)
            part = key.rsplit("_", 1)[-1]
            suffix = f" ({part})" if len(keys) > 1 else ""
            axis.plot(np.arange(len(values)), values, style, color=colour, marker="o", label=entry["label"] + suffix)
    axis.set_xlabel("layer")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    if log:
        axis.set_yscale("log")
    axis.legend(fontsize="small")
    axis.grid(alpha=0.3)


def _per_layer_plot(models: Sequence[dict], keys: Sequence[tuple[str, str]], ylabel: str, log: bool, title: str):
    figure, axis = plt.subplots(figsize=(7, 4), layout="constrained")
    _draw_per_layer(axis, models, keys, ylabel, log, title)
    return figure


def _first_token_plot(models: Sequence[dict], seq_len: int, sink_epsilon: float):
    """Share, mass and sink rate per layer side by side; the share's chance level (also uniform attention's mass)
    and the sink threshold as dotted lines."""
    figure, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    chance = argmax_share_chance(seq_len)
    panels = (("first_token_share", "share of (query, head) pairs", "Max attention on the first token"),
              ("first_token_attention_mass", "mean attention weight", "Attention mass on the first token"),
              ("sink_rate", "share of (sequence, head) pairs", f"Sink rate (mean first-token mass > {sink_epsilon:g})"))
    for axis, (key, ylabel, title) in zip(axes, panels):
        _draw_per_layer(axis, models, [(key, "-")], ylabel, False, title)
    for axis in axes[:2]:
        axis.axhline(chance, color="grey", linestyle=":", label=f"chance at T={seq_len}")
        axis.legend(fontsize="small")
    return figure


def _maps_figure(models: Sequence[dict], maps: Sequence[SampleMaps], kind: str):
    columns = max(len(m.heads) for m in maps) if kind == "attention" else 1
    figure, axes = plt.subplots(len(models), columns, figsize=(3.2 * columns + 1, 3.2 * len(models)),
                               squeeze=False, layout="constrained")
    for row, (entry, sample) in enumerate(zip(models, maps)):
        if kind == "attention":
            for column, head in enumerate(sample.heads):
                image = axes[row][column].imshow(sample.attention[column], cmap="viridis", vmin=0, vmax=1)
                axes[row][column].set_title(f"{entry['label']}\nlayer {sample.layer}, head {head}", fontsize=8)
                axes[row][column].set_xlabel("key")
                axes[row][column].set_ylabel("query")
            figure.colorbar(image, ax=axes[row].tolist(), shrink=0.8)
        else:
            axis = axes[row][0]
            image = axis.imshow(sample.activations, cmap="magma", aspect="auto", interpolation="nearest")
            axis.set_title(f"{entry['label']}: |X| of block {sample.layer}, first sample", fontsize=9)
            axis.set_xlabel("channel")
            axis.set_ylabel("token")
            figure.colorbar(image, ax=axis)
    return figure


def _perplexity_vs_bits(models: Sequence[dict]):
    labels = list(dict.fromkeys(r["weights"] for e in models for r in weight_only_results(e)))
    figure, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels), 3.4), squeeze=False, sharey=True,
                             layout="constrained")
    for axis, label in zip(axes[0], labels):
        for index, entry in enumerate(models):
            points = {r["bits"]: r["perplexity"] for r in weight_only_results(entry) if r["weights"] == label}
            points[FULL_PRECISION_BITS] = entry["perplexity"]
            bits = sorted(points)
            axis.plot(bits, [points[b] for b in bits], marker="o", color=f"C{index}", label=entry["label"])
        axis.set_title(label, fontsize=9)
        ticks = sorted({r["bits"] for e in models for r in weight_only_results(e)} | {FULL_PRECISION_BITS})
        axis.set_xscale("log", base=2)
        axis.set_xticks(ticks, [str(b) if b != FULL_PRECISION_BITS else "full" for b in ticks])
        axis.set_xlabel("weight bits")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("perplexity")
    axes[0][-1].legend(fontsize="small")
    return figure


def write_plots(out_dir: str, models: Sequence[dict], maps: Sequence[SampleMaps], seq_len: int,
                sink_epsilon: float = DEFAULT_SINK_EPSILON) -> list[str]:
    """Write every plot into ``out_dir``; returns the file names (relative to ``out_dir``). ``seq_len`` places the
    share's chance level, ``sink_epsilon`` names the sink rate's threshold."""
    written = [
        _save(_first_token_plot(models, seq_len, sink_epsilon), out_dir, "first_token_share.png"),
        _save(_per_layer_plot(models, [("kurtosis_first", "--"), ("kurtosis_rest", "-")], "Pearson kurtosis", True,
                              "Hidden-state kurtosis (first token dashed)"), out_dir, "kurtosis.png"),
        _save(_per_layer_plot(models, [("max_abs_first", "--"), ("max_abs_rest", "-")], "mean max |X|", True,
                              "Max |activation| (first token dashed)"), out_dir, "max_activation.png"),
        _save(_maps_figure(models, maps, "attention"), out_dir, "attention_maps.png"),
        _save(_maps_figure(models, maps, "activations"), out_dir, "activation_map.png"),
    ]
    if any(weight_only_results(entry) for entry in models):
        written.append(_save(_perplexity_vs_bits(models), out_dir, "perplexity_vs_bits.png"))
    return written
