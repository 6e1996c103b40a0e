"""What the testbed must show, checked on the analyser's numbers: the baseline has an attention sink and a first-token
outlier, softmax-1 removes the sink, softmax-1 + OrthoAdam removes the outlier and survives 4-bit round-to-nearest, and
nobody pays for it in perplexity. The thresholds are the testbed's acceptance targets (docs/testbed.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

BASELINE, TREATED = "baseline", "softmax1+orthoadam"
SOFTMAX1_LABELS = ("softmax1", TREATED)
PAPER_LABELS = ("baseline", "softmax1", "orthoadam", TREATED)

SINK_MASS = 0.3  # baseline: mean first-token attention mass at least this ...
SINK_RATE = 0.3  # ... or this share of heads are sinks
BASELINE_KURTOSIS = 20.0  # baseline: first-token kurtosis at least this
BASELINE_OUTLIER_RATIO = 5.0  # baseline: max|X| first / rest at least this
SINK_CUT = 5.0  # softmax-1 variants: first-token mass or sink rate at most a fifth of the baseline's
TREATED_KURTOSIS = 5.0  # softmax-1 + OrthoAdam: kurtosis of the first token and of the rest at most this
TREATED_OUTLIER_RATIO = 2.0  # softmax-1 + OrthoAdam: max|X| first / rest at most this
PERPLEXITY_TOLERANCE = 0.10  # every variant within 10% of the baseline's full-precision perplexity
PENALTY_CUT = 5.0  # softmax-1 + OrthoAdam: 4-bit per-tensor RTN penalty at most a fifth of the baseline's
PENALTY_SCHEME = "w4-sym-tensor"


@dataclass(frozen=True)
class Criterion:
    criterion: str
    measured: str
    passed: bool


def outlier_ratio(metrics: dict) -> float:
    """max|X| of the first token over max|X| of the other tokens (layer averages)."""
    return metrics["max_abs_first"] / metrics["max_abs_rest"]


def reduction(before: float, after: float) -> float:
    """How many times smaller ``after`` is than ``before`` (inf when it fell to 0)."""
    return math.inf if after <= 0 else before / after


def penalty(model: dict, scheme: str = PENALTY_SCHEME) -> float:
    """The model's perplexity penalty under ``scheme`` (NaN when it was not measured)."""
    return next((result["penalty"] for result in model["quantization"] if result["scheme"] == scheme), math.nan)


def check_acceptance(analysis: dict) -> list[Criterion]:
    """Every criterion whose models are in ``analysis`` (the analyser's analysis.json), in the order of the targets."""
    models = {model["label"]: model for model in analysis["models"]}
    if BASELINE not in models:
        return []
    base = models[BASELINE]["metrics"]
    results = [
        Criterion(f"baseline has a sink: first-token mass >= {SINK_MASS} or sink rate >= {SINK_RATE:.0%}",
                  f"mass {base['first_token_attention_mass']:.3f}, sink rate {base['sink_rate']:.0%}",
                  base["first_token_attention_mass"] >= SINK_MASS or base["sink_rate"] >= SINK_RATE),
        Criterion(f"baseline has a first-token outlier: kurtosis >= {BASELINE_KURTOSIS:g} and max|X| first/rest >= "
                  f"{BASELINE_OUTLIER_RATIO:g}",
                  f"kurtosis {base['kurtosis_first']:.1f}, ratio {outlier_ratio(base):.1f}",
                  base["kurtosis_first"] >= BASELINE_KURTOSIS and outlier_ratio(base) >= BASELINE_OUTLIER_RATIO),
    ]
    for label in (label for label in SOFTMAX1_LABELS if label in models):
        metrics = models[label]["metrics"]
        mass_cut = reduction(base["first_token_attention_mass"], metrics["first_token_attention_mass"])
        rate_cut = reduction(base["sink_rate"], metrics["sink_rate"])
        results.append(Criterion(
            f"{label} cuts the baseline's first-token mass or sink rate >= {SINK_CUT:g}x",
            f"mass {metrics['first_token_attention_mass']:.3f} ({mass_cut:.1f}x), sink rate "
            f"{metrics['sink_rate']:.0%} ({rate_cut:.1f}x)", max(mass_cut, rate_cut) >= SINK_CUT))
    if TREATED in models:
        treated = models[TREATED]["metrics"]
        results.append(Criterion(
            f"{TREATED} has no outlier: kurtosis first and rest <= {TREATED_KURTOSIS:g}, max|X| first/rest <= "
            f"{TREATED_OUTLIER_RATIO:g}",
            f"kurtosis {treated['kurtosis_first']:.1f} / {treated['kurtosis_rest']:.1f}, ratio "
            f"{outlier_ratio(treated):.1f}",
            max(treated["kurtosis_first"], treated["kurtosis_rest"]) <= TREATED_KURTOSIS
            and outlier_ratio(treated) <= TREATED_OUTLIER_RATIO))
    reference = models[BASELINE]["perplexity"]
    compared = [label for label in PAPER_LABELS if label in models]
    worst = max(abs(models[label]["perplexity"] / reference - 1) for label in compared)
    results.append(Criterion(
        f"{', '.join(compared)} within {PERPLEXITY_TOLERANCE:.0%} of the baseline's perplexity",
        ", ".join(f"{label} {models[label]['perplexity']:.3f}" for label in compared),
        worst <= PERPLEXITY_TOLERANCE))
    if TREATED in models:
        base_penalty, treated_penalty = penalty(models[BASELINE]), penalty(models[TREATED])
        results.append(Criterion(
            f"{TREATED}'s 4-bit per-tensor RTN penalty ({PENALTY_SCHEME}) <= 1/{PENALTY_CUT:g} of the baseline's",
            f"{treated_penalty:+.3f} vs {base_penalty:+.3f}",
            treated_penalty <= base_penalty / PENALTY_CUT))
    return results


def acceptance_table(results: list[Criterion]) -> str:
    """The criteria as a Markdown table."""
    lines = ["| criterion | measured | met |", "|---|---|---|"]
    lines += [f"| {r.criterion} | {r.measured} | {'yes' if r.passed else '**no**'} |" for r in results]
    return "\n".join(lines)
