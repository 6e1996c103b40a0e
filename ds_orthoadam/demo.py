"""``make demo``: the disease and the cure, side by side, from real 2-rank CPU pre-training runs.

Trains the baseline (softmax + AdamW) and softmax-1 + OrthoAdam on the testbed (:mod:`ds_orthoadam.testbed`: the
synthetic Bigram-Backcopy data, ``llama-testbed``, ``ds_orthoadam.train`` through the deepspeed launcher on 2 CPU
ranks under ZeRO-1), analyses both exports with ``ds-orthoadam-analyze`` and prints one table: validation loss and
perplexity, first-token attention mass and sink rate, hidden-state kurtosis and max |activation| of the first token
and of the rest, and the 4-bit round-to-nearest penalty. As the bar both models have to clear it also prints the
unigram entropy of the training tokens (the loss of the best model that ignores context) and the Bayes-optimal loss
of the task (the floor): a validation loss not clearly below the unigram entropy fails the demo.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from itertools import islice
from pathlib import Path

from ds_orthoadam import testbed
from ds_orthoadam.analysis.curves import plot_telemetry
from ds_orthoadam.cli import ensure_output_dir, integer_at_least, report_error
from ds_orthoadam.data import TrainStream, load_tokenizer
from ds_orthoadam.errors import UserError
from ds_orthoadam.testbed_acceptance import PENALTY_SCHEME, outlier_ratio, penalty

DEMO_VARIANTS = (testbed.BASELINE, testbed.TREATED)
UNIGRAM_SAMPLE_BATCHES = 200
CONTEXT_MARGIN = 0.5  # nats the validation loss must stay below the unigram entropy
EXIT_NOT_LEARNED = 1
COLUMN_TITLES = {"baseline": "baseline (softmax + AdamW)", "softmax1+orthoadam": "softmax-1 + OrthoAdam"}


def unigram_entropy(batches) -> float:
    """Entropy (nats) of the token frequency distribution over ``batches`` of training ids."""
    counts: Counter = Counter()
    for batch in batches:
        counts.update(batch["input_ids"].flatten().tolist())
    total = sum(counts.values())
    return -sum(n / total * math.log(n / total) for n in counts.values())


def corpus_unigram_entropy(data_dir: Path) -> float:
    stream = TrainStream(str(data_dir), load_tokenizer(str(data_dir / "tokenizer")), testbed.SEQ_LEN, 8, rank=0,
                         world_size=1)
    return unigram_entropy(islice(iter(stream), UNIGRAM_SAMPLE_BATCHES))


def summary_rows(models: dict[str, dict]) -> list[tuple[str, list[str]]]:
    """(metric, one value per model) from the analyser's records of the demo's models."""
    def row(name: str, value) -> tuple[str, list[str]]:
        return name, [value(model) for model in models.values()]

    return [
        row("validation loss (nats/token)", lambda m: f"{math.log(m['perplexity']):.3f}"),
        row("validation perplexity", lambda m: f"{m['perplexity']:.3f}"),
        row("first-token attention mass", lambda m: f"{m['metrics']['first_token_attention_mass']:.3f}"),
        row("sink rate (heads > 0.3 on the first token)", lambda m: f"{m['metrics']['sink_rate']:.0%}"),
        row("kurtosis first token / rest", lambda m: f"{m['metrics']['kurtosis_first']:.1f} / "
                                                     f"{m['metrics']['kurtosis_rest']:.1f}"),
        row("max |activation| first token / rest", lambda m: f"{m['metrics']['max_abs_first']:.1f} / "
                                                             f"{m['metrics']['max_abs_rest']:.1f} "
                                                             f"({outlier_ratio(m['metrics']):.1f}x)"),
        row(f"4-bit RTN perplexity penalty ({PENALTY_SCHEME})", lambda m: f"{penalty(m):+.3f}"),
    ]


def summary_table(header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """A Markdown table, padded so that it also reads well as plain text."""
    cells = [header] + [[name, *values] for name, values in rows]
    widths = [max(len(line[column]) for line in cells) for column in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |" for line in cells]
    return "\n".join([lines[0], "|" + "|".join("-" * (width + 2) for width in widths) + "|", *lines[1:]])


def run_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    ensure_output_dir(args.output_dir, "--output-dir")
    task = testbed.ensure_data(args.data)
    for variant in DEMO_VARIANTS:
        testbed.train(variant, args.output_dir, args.data, steps=args.steps, seed=args.seed)
    analysis = testbed.analyze(list(DEMO_VARIANTS), args.output_dir, args.data, quant=PENALTY_SCHEME)
    figure = plot_telemetry({variant.label: testbed.run_dir(args.output_dir, variant) / "metrics.jsonl"
                             for variant in DEMO_VARIANTS}, args.output_dir / "analysis" / "telemetry.png")
    models = {model["label"]: model for model in analysis["models"]}
    entropy = corpus_unigram_entropy(args.data)
    print(f"\n{testbed.MODEL}, {args.steps} steps, 2 CPU ranks, ZeRO-1; {analysis['models'][0]['data']['documents']} "
          f"validation documents; unigram entropy of the training tokens {entropy:.3f} nats, Bayes-optimal loss "
          f"{task['optimal_validation_loss']:.3f} nats\n")
    print(summary_table(["metric", *(COLUMN_TITLES[label] for label in models)], summary_rows(models)))
    print(f"\ntelemetry during training: {figure}\nreport and plots: {args.output_dir / 'analysis'}\n"
          f"TensorBoard: make tensorboard RUN_ROOT={args.output_dir / 'runs'}\nHugging Face exports: "
          f"{args.output_dir / 'models'}\ndemo took {(time.perf_counter() - started) / 60:.1f} minutes")
    not_learned = [label for label, model in models.items()
                   if math.log(model["perplexity"]) >= entropy - CONTEXT_MARGIN]
    if not_learned:
        print(f"demo: the validation loss of {', '.join(not_learned)} is not clearly below the unigram entropy "
              f"{entropy:.3f}: the model did not learn from context", file=sys.stderr)
        return EXIT_NOT_LEARNED
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ds_orthoadam.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/testbed"),
                        help="the testbed's data directory (generated there if missing)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"), help="where runs, exports and the "
                        "analysis go; running the demo again skips what is trained already")
    parser.add_argument("--steps", type=integer_at_least(1), default=testbed.STEPS,
                        help="optimiser steps per model (the testbed's: the demo's runs are make reproduce's)")
    parser.add_argument("--seed", type=integer_at_least(0), default=0, help="seed of initialisation and data order")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_demo(args)
    except UserError as error:
        return report_error(error)


if __name__ == "__main__":
    sys.exit(main())
