"""``make demo``: a real 2-rank CPU pre-training run on the built-in demo corpus, then a summary table.

Runs ``ds_orthoadam.train`` through the deepspeed launcher (2 CPU ranks, ZeRO-1, fp32) on ``llama-tiny`` with
softmax-1 attention and OrthoAdam, evaluates and exports it, then prints validation loss and perplexity, the outlier
metrics of the exported model on the probe batch (first-token attention share, hidden-state kurtosis of the first
token and of the rest) and, as the bar the model has to clear, the unigram entropy of the training tokens: the loss
of the best model that ignores context. A validation loss clearly below it means the model learned from context.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from itertools import islice
from pathlib import Path

from transformers import AutoModelForCausalLM

import ds_orthoadam  # noqa: F401  (registers softmax-1 for reloading the export)
from ds_orthoadam.analysis.metrics import outlier_metrics
from ds_orthoadam.data import TrainStream, load_tokenizer, validation_batches, validation_source
from ds_orthoadam.distributed import free_port
from ds_orthoadam.telemetry import HEADLINE_OUTLIER_METRICS

DEMO_MODEL = "llama-tiny"
UNIGRAM_SAMPLE_BATCHES = 200
PROBE_SEQUENCES = 8


def unigram_entropy(batches) -> float:
    """Entropy (nats) of the token frequency distribution over ``batches`` of training ids."""
    counts: Counter = Counter()
    for batch in batches:
        counts.update(batch["input_ids"].flatten().tolist())
    total = sum(counts.values())
    return -sum(n / total * math.log(n / total) for n in counts.values())


def training_command(args: argparse.Namespace) -> list[str]:
    launcher = Path(sys.executable).with_name("deepspeed")
    validation = ["--val-data", args.val_data] if args.val_data else []
    return [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "ds_orthoadam.train",
            "--model", DEMO_MODEL, "--attention", "softmax1", "--optimizer", "orthoadam",
            "--data", args.data, "--tokenizer", args.tokenizer, *validation,
            "--seq-len", str(args.seq_len), "--train-steps", str(args.steps),
            "--set", f"scheduler.params.total_num_steps={args.steps}",
            "--log-every", "20", "--eval-every", "100", "--outlier-every", "100", "--checkpoint-every", "100",
            "--val-samples", str(args.val_samples), "--output-dir", str(args.output_dir), "--resume", "auto"]


def final_scalars(metrics_file: Path) -> dict[str, float]:
    """The last value of every scalar in a run's metrics.jsonl."""
    latest: dict[str, float] = {}
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        latest.update({key: value for key, value in json.loads(line).items() if key != "step"})
    return latest


def exported_outliers(export_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """Outlier metrics of the exported model (reloaded through transformers) on the first validation batch."""
    tokenizer = load_tokenizer(args.tokenizer)
    batch = next(iter(validation_batches(validation_source(args.data, args.val_data), tokenizer, args.seq_len,
                                         PROBE_SEQUENCES, num_docs=PROBE_SEQUENCES)))
    return outlier_metrics(AutoModelForCausalLM.from_pretrained(export_dir), batch["input_ids"])


def corpus_unigram_entropy(args: argparse.Namespace) -> float:
    stream = TrainStream(args.data, load_tokenizer(args.tokenizer), args.seq_len, 8, rank=0, world_size=1)
    return unigram_entropy(islice(iter(stream), UNIGRAM_SAMPLE_BATCHES))


def summary_table(rows: list[tuple[str, str]]) -> str:
    """A Markdown table of (metric, value) rows, padded so that it also reads well as plain text."""
    name_width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    lines = [f"| {'metric':<{name_width}} | {'value':<{value_width}} |",
             f"|{'-' * (name_width + 2)}|{'-' * (value_width + 2)}|"]
    return "\n".join(lines + [f"| {name:<{name_width}} | {value:<{value_width}} |" for name, value in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_orthoadam.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="data/demo", help="demo training source (make demo-data)")
    parser.add_argument("--val-data", default=None, help="validation source (default: the demo's validation shard)")
    parser.add_argument("--tokenizer", default="data/demo/tokenizer", help="demo tokenizer (make tokenizer)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"), help="run directory")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps")
    parser.add_argument("--seq-len", type=int, default=128, help="sequence length")
    parser.add_argument("--val-samples", type=int, default=33, help="validation documents (the demo corpus has 33)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print("$ " + " ".join(training_command(args)), flush=True)
    result = subprocess.run(training_command(args), env=env)
    if result.returncode != 0:
        print(f"demo: training failed with exit status {result.returncode}", file=sys.stderr)
        return result.returncode

    scalars = final_scalars(args.output_dir / "metrics.jsonl")
    entropy = corpus_unigram_entropy(args)
    outliers = exported_outliers(args.output_dir / "hf", args)
    val_loss = scalars["Val/loss"]
    rows = [("model", f"{DEMO_MODEL}, softmax-1 + OrthoAdam, 2 CPU ranks, ZeRO-1"),
            ("validation loss (nats/token)", f"{val_loss:.3f}"),
            ("validation perplexity", f"{scalars['Val/ppl']:.1f}"),
            ("unigram entropy of the training tokens (nats)", f"{entropy:.3f}")]
    rows += [(f"{name} (exported model, validation batch)", f"{outliers[name]:.3f}")
             for name in HEADLINE_OUTLIER_METRICS]
    print("\n" + summary_table(rows) + "\n")
    print(f"TensorBoard logs: {args.output_dir / 'tensorboard'}   (make tensorboard RUN_ROOT={args.output_dir.parent})")
    print(f"Hugging Face export: {args.output_dir / 'hf'}")
    print(f"demo took {(time.perf_counter() - started) / 60:.1f} minutes")
    if val_loss >= entropy - 0.5:
        print(f"demo: validation loss {val_loss:.3f} is not clearly below the unigram entropy {entropy:.3f}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
