"""Write the analysis of several models as one JSON file (every number) and one Markdown report (paper layout)."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

from ds_orthoadam.analysis.metrics import DEFAULT_SINK_EPSILON, argmax_share_chance
from ds_orthoadam.analysis.quantize import PAPER_COMPARABLE_SCHEME, QuantScheme

FULL_PRECISION_NOTE = (
    "Quantised: every nn.Linear / GPT2 Conv1D except the LM head (attention q/k/v/o and MLP projections). "
    "Full precision: token/position embeddings, LM head, norms, biases, attention scores and weighted sums, "
    "residual additions. W8A8 weights are 8-bit absmax per output channel; activations (inputs of the quantised "
    "layers) are 8-bit absmax with a dynamic scale per sequence over its real (unpadded) tokens (per-tensor: "
    "independent of the batch size and of which sequences share a batch) or per token."
)


def definitions_note(sink_epsilon: float = DEFAULT_SINK_EPSILON) -> str:
    """What the outlier table's columns mean (stored in analysis.json's settings too)."""
    return (
        "First-token share: fraction of (query, head) pairs whose largest attention weight is on the first token "
        "(strictly larger than on any other token); the first query, which can only see itself, is excluded. "
        "softmax-1 is softmax scaled per row by sigmoid(L), so its argmax, and this share, equal softmax's: the share "
        "cannot show a head attending \"nowhere\"; the mass and the sink rate can. Mass: mean attention weight on the "
        f"first token over the same pairs. Sink rate (Gu et al., ICLR 2025; epsilon = {sink_epsilon:g}): share of "
        "(sequence, head) pairs, averaged over layers, whose mean attention on the first token over the sequence's "
        f"queries exceeds {sink_epsilon:g}. Kurtosis: Pearson (Gaussian = 3) over the hidden dimension of each block "
        "output, per token, averaged over tokens and then layers; excess = Pearson - 3. max|X|: max over channels "
        "per token, averaged over tokens and layers. Penalty: quantised minus full-precision perplexity."
    )


DEFINITIONS_NOTE = definitions_note()  # with the default epsilon (kept for importers)


def chance_note(seq_len: int, models: Sequence[dict]) -> str:
    """The share's chance level for ``seq_len`` and, where padding made it differ, the measured queries'."""
    note = (f"Chance level of the first-token share at sequence length {seq_len}: "
            f"{100 * argmax_share_chance(seq_len):.2f}% = (H_T - 1) / (T - 1), the mean over queries i = 1..T-1 of "
            "1/(i+1), i.e. the share if every visible token were equally likely to hold the largest weight; it is "
            "also the first-token mass of uniform attention (exactly uniform attention has share 0: ties do not "
            "count).")
    differing = [f"{e['label']} {100 * e['metrics']['first_token_share_chance']:.2f}%" for e in models
                 if _differs(e["metrics"].get("first_token_share_chance"), argmax_share_chance(seq_len))]
    return note + (f" For the queries measured (shorter, padded sequences): {', '.join(differing)}." if differing
                   else "")


def _differs(measured: float | None, expected: float) -> bool:
    return measured is not None and math.isfinite(measured) and abs(measured - expected) > 1e-9


def _number(value: float | None, digits: int = 2) -> str:
    """A table cell; None (a non-finite number read back from analysis.json) and NaN are "n/a"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 1e5:
        return f"{value:.3g}"
    return f"{value:,.{digits}f}"


def _signed(value: float | None) -> str:
    """A penalty cell: signed, "n/a" for None/NaN (e.g. a diverged model's infinite perplexity minus another)."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:+.3g}" if abs(value) >= 1e5 else f"{value:+.2f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def outlier_table(models: Sequence[dict]) -> list[str]:
    header = ["Model", "First-token share", "First-token mass", "Sink rate", "Kurtosis first", "Kurtosis rest",
              "Excess kurt. first", "Excess kurt. rest", "max\\|X\\| first", "max\\|X\\| rest", "PPL"]
    rows = []
    for entry in models:
        m = entry["metrics"]
        rows.append([entry["label"], _percent(m["first_token_share"]), _percent(m["first_token_attention_mass"]),
                     _percent(m.get("sink_rate")),  # absent from files of older releases
                     _number(m["kurtosis_first"]), _number(m["kurtosis_rest"]), _number(m["excess_kurtosis_first"]),
                     _number(m["excess_kurtosis_rest"]), _number(m["max_abs_first"]), _number(m["max_abs_rest"]),
                     _number(entry["perplexity"])])
    return _table(header, rows)


def weight_only_results(entry: dict) -> list[dict]:
    """The model entry's quantisation results without activation quantisation (W8A8 excluded)."""
    return [r for r in entry["quantization"] if r["activations"] is None]


def is_paper_comparable(result: dict) -> bool:
    """Whether a quantisation result is the one comparable with the paper's 4-bit RTN penalty (see quantize.py)."""
    return result["scheme"] == PAPER_COMPARABLE_SCHEME


PAPER_COMPARABLE_NOTE = (
    f"**Bold**: `{PAPER_COMPARABLE_SCHEME}`, the penalty comparable with the paper's 4-bit RTN penalty (weight-only, "
    "4-bit, round-to-nearest, linear layers only; the paper names no grouping, so the plain one: one absmax scale "
    "per matrix). Per-channel and group-wise rows are finer schemes the paper does not report."
)


def weight_only_table(models: Sequence[dict]) -> list[str]:
    """One row per (model, weight quantiser); ppl and penalty per bit width (the paper-comparable cell in bold)."""
    bit_widths = sorted({r["bits"] for e in models for r in weight_only_results(e)}, reverse=True)
    header = ["Model", "Weights"] + [f"W{bits} {column}" for bits in bit_widths for column in ("PPL", "penalty")]
    rows = []
    for entry in models:
        results = weight_only_results(entry)
        for label in dict.fromkeys(r["weights"] for r in results):
            by_bits = {r["bits"]: r for r in results if r["weights"] == label}
            cells = []
            for bits in bit_widths:
                result = by_bits.get(bits)
                if result is None:
                    cells += ["", ""]
                    continue
                penalty = _signed(result["penalty"])
                cells += [_number(result["perplexity"]), f"**{penalty}**" if is_paper_comparable(result) else penalty]
            rows.append([entry["label"], label] + cells)
    return _table(header, rows)


def activation_table(models: Sequence[dict]) -> list[str]:
    header = ["Model", "Scheme", "Activations", "PPL", "Penalty"]
    rows = [[e["label"], r["family"], f"per-{r['activations']}", _number(r["perplexity"]), _signed(r["penalty"])]
            for e in models for r in e["quantization"] if r["activations"] is not None]
    return _table(header, rows)


def per_layer_table(entry: dict) -> list[str]:
    layers = entry["per_layer"]
    header = ["Layer", "First-token share", "Mass", "Sink rate", "Kurtosis first", "Kurtosis rest",
              "max\\|X\\| first", "max\\|X\\| rest"]
    sink_rate = layers.get("sink_rate", [None] * entry["model"]["layers"])  # absent from files of older releases
    rows = [[str(i), _percent(layers["first_token_share"][i]), _percent(layers["first_token_attention_mass"][i]),
             _percent(sink_rate[i]),
             _number(layers["kurtosis_first"][i]), _number(layers["kurtosis_rest"][i]),
             _number(layers["max_abs_first"][i]), _number(layers["max_abs_rest"][i])]
            for i in range(entry["model"]["layers"])]
    return _table(header, rows)


def markdown_report(report: dict, plots: Sequence[str]) -> str:
    models = report["models"]
    settings = report["settings"]
    lines = ["# Outlier and quantisation analysis", "",
             f"Data: `{settings['data']}`, sequence length {settings['seq_len']}, {settings['mode']} mode (every "
             "sequence starts with BOS).", ""]
    for entry in models:
        d = entry["data"]
        asked = f" (asked for {settings['samples']})" if d["documents"] < settings["samples"] else ""
        lines.append(f"- **{entry['label']}** (`{entry['path']}`, {entry['model']['class']}, attention "
                     f"`{entry['model']['attention_implementation']}`): {d['documents']} documents{asked}, "
                     f"{d['sequences']} sequences, {d['predicted_tokens']} predicted tokens, first token is BOS in "
                     f"{_percent(d['first_token_is_bos_fraction'])} of sequences.")
    lines += ["", "## Attention sinks and outlier activations", ""] + outlier_table(models)
    definitions = settings.get("definitions", DEFINITIONS_NOTE)
    lines += ["", definitions, "", chance_note(settings["seq_len"], models), ""]
    if any(e["quantization"] for e in models):
        lines += ["## Quantisation (round-to-nearest)", ""]
        if any(weight_only_results(e) for e in models):
            lines += ["### Weight-only", ""] + weight_only_table(models) + [""]
            if any(is_paper_comparable(r) for e in models for r in e["quantization"]):
                lines += [PAPER_COMPARABLE_NOTE, ""]
        if any(r["activations"] for e in models for r in e["quantization"]):
            lines += ["### Weights and activations", ""] + activation_table(models) + [""]
        lines += [FULL_PRECISION_NOTE, ""]
    lines += ["## Per layer", ""]
    for entry in models:
        lines += [f"### {entry['label']}", ""] + per_layer_table(entry) + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def report_settings(
    data: str, samples: int, seq_len: int, batch_size: int, mode: str, schemes: Sequence[QuantScheme],
    sink_epsilon: float = DEFAULT_SINK_EPSILON,
) -> dict:
    """The run's options and the definitions the numbers follow, stored in the JSON next to the numbers."""
    return {"data": data, "samples": samples, "seq_len": seq_len, "batch_size": batch_size, "mode": mode,
            "quantization_schemes": [scheme.name for scheme in schemes], "sink_epsilon": sink_epsilon,
            "paper_comparable_scheme": PAPER_COMPARABLE_SCHEME, "first_token_share_chance":
            argmax_share_chance(seq_len), "full_precision": FULL_PRECISION_NOTE,
            "definitions": definitions_note(sink_epsilon)}


def json_safe(value):
    """``value`` with NaN / infinity replaced by None, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_report(out_dir: str, report: dict, plots: Sequence[str]) -> tuple[str, str]:
    """Write ``analysis.json`` and ``report.md`` into ``out_dir``; returns their paths."""
    json_path, markdown_path = os.path.join(out_dir, "analysis.json"), os.path.join(out_dir, "report.md")
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(json_safe(report), handle, indent=2, allow_nan=False)
    with open(markdown_path, "w", encoding="utf-8") as handle:
        handle.write(markdown_report(report, plots))
    return json_path, markdown_path
