"""``ds-orthoadam-analyze``: outlier, perplexity and quantisation analysis of one or more causal LM directories.

    ds-orthoadam-analyze --model runs/softmax --model runs/softmax1 --data data/demo --samples 1000 --out analysis/

Writes OUT/analysis.json (every number), OUT/report.md (tables in the paper's layout) and OUT/*.png (plots).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

from ds_orthoadam.analysis.errors import AnalysisInputError
from ds_orthoadam.analysis.loading import DTYPES, check_model_directory, load_causal_lm, load_matching_tokenizer
from ds_orthoadam.analysis.metrics import DEFAULT_SINK_EPSILON
from ds_orthoadam.analysis.plots import write_plots
from ds_orthoadam.analysis.quantize import DEFAULT_GROUP_SIZE, default_schemes, scheme_by_name
from ds_orthoadam.analysis.report import report_settings, write_report
from ds_orthoadam.analysis.runner import analyze_model
from ds_orthoadam.cli import ensure_output_dir, run_main
from ds_orthoadam.data import resolve_source, validation_batches


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-orthoadam-analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="DIR",
                        help="local Hugging Face causal LM directory; repeat to compare several models")
    parser.add_argument("--data", required=True, metavar="SRC",
                        help="validation source, same strings as the trainer's --data: c4 (hub), a directory (its "
                             "c4-validation.* shards or pre-tokenised validation/), .json/.json.gz/.jsonl/.txt files "
                             "or globs")
    parser.add_argument("--samples", type=int, required=True, metavar="N",
                        help="number of validation documents (the paper uses 100000)")
    parser.add_argument("--out", required=True, metavar="OUT", help="output directory (created if missing)")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory for every model (default: the model's)")
    parser.add_argument("--seq-len", type=int, default=256, help="sequence length (default: 256, as in the paper)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    parser.add_argument("--mode", choices=("pack", "pad"), default="pack",
                        help="pack: BOS + a stream of documents per sequence; pad: one document per sequence")
    parser.add_argument("--quant", default="all", metavar="SCHEMES",
                        help="'all' (default), 'none', or comma-separated scheme names, "
                             "e.g. w4-sym-group128,w8a8-token")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="group size of group-wise schemes")
    parser.add_argument("--sink-epsilon", type=float, default=DEFAULT_SINK_EPSILON, metavar="EPS",
                        help="sink rate threshold: a head is a sink when its mean attention on the first token "
                             f"exceeds EPS (default: {DEFAULT_SINK_EPSILON}, Gu et al.)")
    parser.add_argument("--map-layer", type=int, help="layer of the attention/activation map plots (default: middle)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="auto", help="weight dtype (default: as saved)")
    return parser


def _schemes(spec: str, group_size: int):
    if spec == "all":
        return default_schemes(group_size)
    if spec == "none":
        return []
    return [scheme_by_name(name.strip(), group_size) for name in spec.split(",") if name.strip()]


def _labels(paths: list[str]) -> list[str]:
    """Short names for the tables: the directory's base name, made unique with its parent if needed."""
    names = [os.path.basename(os.path.normpath(path)) for path in paths]
    return [
        name if names.count(name) == 1 else os.path.join(os.path.basename(os.path.dirname(os.path.normpath(p))), name)
        for name, p in zip(names, paths)
    ]


def _check_arguments(args: argparse.Namespace) -> None:
    if args.samples < 1:
        raise AnalysisInputError(f"--samples must be at least 1, got {args.samples}")
    if args.seq_len < 2 or args.batch_size < 1:
        raise AnalysisInputError("--seq-len must be at least 2 and --batch-size at least 1")
    if not 0.0 <= args.sink_epsilon < 1.0:
        raise AnalysisInputError(f"--sink-epsilon must be in [0, 1) (a share of a row's attention), got "
                                 f"{args.sink_epsilon}; Gu et al. use {DEFAULT_SINK_EPSILON}")
    _check_device(args.device)


def _check_device(name: str) -> None:
    """A device torch can place tensors on here (an unknown name or a CUDA device on a CPU build would otherwise be
    a traceback once the first model is loaded)."""
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as error:
        raise AnalysisInputError(f"--device {name!r} is not usable here ({str(error).splitlines()[0]}); use "
                                 f"--device cpu{' or cuda' if torch.cuda.is_available() else ''}") from error


def _check_positions(model, seq_len: int, path: str) -> None:
    config = model.config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and seq_len > limit:
        raise AnalysisInputError(f"--seq-len {seq_len} exceeds the {limit} positions of {path}; use --seq-len {limit}")


def run(args: argparse.Namespace) -> str:
    """Analyse every model and write the report; returns the Markdown report's path."""
    _check_arguments(args)
    schemes = _schemes(args.quant, args.group_size)
    source = resolve_source(args.data, "validation")
    for path in args.model:
        check_model_directory(path)
    ensure_output_dir(args.out)
    entries, maps = [], []
    report = {"settings": report_settings(args.data, args.samples, args.seq_len, args.batch_size, args.mode,
                                           schemes, args.sink_epsilon),
              "models": entries}
    for path, label in zip(args.model, _labels(args.model)):
        model = load_causal_lm(path, args.device, args.dtype)
        _check_positions(model, args.seq_len, path)
        tokenizer = load_matching_tokenizer(model, args.tokenizer or path)
        batches = validation_batches(source, tokenizer, args.seq_len, args.batch_size, args.samples, mode=args.mode)
        analysis = analyze_model(model, batches, schemes, args.map_layer, label, tokenizer.bos_token_id,
                                 args.sink_epsilon)
        analysis.record["data"]["documents"] = batches.documents_read  # fewer than --samples if the source ends
        entries.append({"label": label, "path": os.path.abspath(path)} | analysis.record)
        maps.append(analysis.maps)
        write_report(args.out, report, [])  # keep finished models' numbers if a later model fails
        del model
        gc.collect()
    plots = write_plots(args.out, entries, maps, args.seq_len, args.sink_epsilon)
    _, markdown = write_report(args.out, report, plots)
    return markdown


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: f"report written to {run(args)}")


if __name__ == "__main__":
    sys.exit(main())
