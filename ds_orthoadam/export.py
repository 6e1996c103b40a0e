"""Export a training checkpoint to a Hugging Face model directory (config, safetensors weights, tokenizer).

The weights come from the checkpoint's fp32 master copy, not from the (possibly fp16) training module: for a
mixed-precision run that is the precise model. The config records the attention implementation
(``attn_implementation``), so the directory reloads with softmax-1 through::

    import ds_orthoadam
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(directory)

Runs on the CPU in one process from the checkpoint files alone (no launcher, any world size), both at the end of
training and on demand: ``python -m ds_orthoadam.export --run-dir OUT [--tag TAG] --out DIR [--tokenizer TOK]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedConfig

import ds_orthoadam  # noqa: F401  (registers softmax-1 and the single-scale-norm model classes)
from ds_orthoadam.checkpointing import CHECKPOINT_SUBDIR, RUN_FILE, CheckpointManager
from ds_orthoadam.cli import ensure_output_dir, run_main
from ds_orthoadam.data import TokenizerError, check_vocab_fits, load_tokenizer
from ds_orthoadam.errors import UserError, summary
from ds_orthoadam.models import build_config
from ds_orthoadam.zero_orthoadam import export_fp32_state_dict


class ExportError(UserError, RuntimeError):
    """A run directory or checkpoint that cannot be exported; the message says why."""

    rank_specific = True  # the trainer's export runs on rank 0 alone


def export_checkpoint(checkpoint_dir: str | os.PathLike, tag: str, config: PreTrainedConfig, tokenizer,
                      out_dir: str | os.PathLike, option: str = "--export-dir") -> Path:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer files) from checkpoint ``tag``.

    ``option`` names the argument ``out_dir`` came from in the error of an unusable output path."""
    out_dir = ensure_output_dir(out_dir, option)  # before any work: save_pretrained on a file only logs
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        state_dict = export_fp32_state_dict(str(checkpoint_dir), tag)  # real theta, also for OrthoAdam's rotated frame
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        raise ExportError(f"checkpoint {Path(checkpoint_dir) / tag} could not be read ({summary(error)}); export "
                          "another complete checkpoint (--tag) or check that its files were copied whole") from error
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [name for name in missing if name not in _tied_names(model)]
    if missing or unexpected:
        raise ExportError(f"checkpoint {tag} does not match the model of {config.model_type}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _check_weights_written(out_dir)
    return out_dir


def _check_weights_written(out_dir: Path) -> None:
    """save_pretrained reports some failures only in the log: never announce an export that holds no weights."""
    if not any((out_dir / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise ExportError(f"the export to {out_dir} wrote no model.safetensors (see the log above); check the "
                          "directory and the free disk space, then export again (python -m ds_orthoadam.export)")


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Parameter names that share storage with an earlier name (e.g. GPT2's lm_head.weight): not stored twice."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
        seen.setdefault(id(tensor), name)
    return tied


def run_model_config(run_dir: str | os.PathLike) -> tuple[PreTrainedConfig, dict]:
    """The model config of a run (rebuilt from its run.json) and the run.json contents."""
    run_file = Path(run_dir) / RUN_FILE
    if not run_file.is_file():
        raise ExportError(f"{run_dir} is not a training output directory (no {RUN_FILE}); pass the --output-dir "
                          "of a ds-orthoadam-train run")
    try:
        run = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"{run_file} is not readable JSON ({summary(error)}); restore it from the run's copy or "
                          "re-create it by restarting the run with the same arguments") from error
    if not isinstance(run, dict) or not isinstance(run.get("model_args"), dict):
        raise ExportError(f"{run_file} has no model_args object (the model the run trained); it is not a "
                          "ds-orthoadam-train run.json: restore it from the run's copy")
    try:
        return build_config(**run["model_args"]), run
    except (TypeError, ValueError) as error:
        raise ExportError(f"the model_args in {run_file} do not build a model ({summary(error)}); restore run.json "
                          "from the run's copy") from error


def run_tokenizer(run: dict, run_file: Path, override: str | None, vocab_size: int):
    """The tokenizer to export with the model: ``override`` (--tokenizer) or the path recorded in run.json.

    run.json records the path as the trainer was given it, so a relative path only resolves from the directory
    training was started in; from anywhere else the message says so and points to --tokenizer."""
    path = override or run.get("tokenizer")
    if not path:
        raise ExportError(f"{run_file} records no tokenizer; pass the run's tokenizer with --tokenizer")
    if override is None and not os.path.isabs(path) and not os.path.exists(path):
        raise ExportError(f"tokenizer {path} (the relative path recorded in {run_file}) does not exist from "
                          f"{os.getcwd()}; run the export from the directory training was started in, or pass the "
                          "tokenizer with --tokenizer")
    tokenizer = load_tokenizer(path)
    try:
        check_vocab_fits(tokenizer, vocab_size)
    except TokenizerError as error:
        raise ExportError(f"tokenizer {path} does not belong to this run: {error}; pass the run's own tokenizer "
                          "with --tokenizer") from error
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_orthoadam.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="output directory of a ds-orthoadam-train run")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete checkpoint)")
    parser.add_argument("--out", required=True, help="directory to write the Hugging Face model to")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer to export with the model (default: the path recorded in the run's run.json)")
    args = parser.parse_args(argv)
    return run_main(lambda: _export_run(args))


def _export_run(args: argparse.Namespace) -> str:
    config, run = run_model_config(args.run_dir)
    tokenizer = run_tokenizer(run, Path(args.run_dir) / RUN_FILE, args.tokenizer, config.vocab_size)
    ensure_output_dir(args.out)  # fail before reading a checkpoint
    manager = CheckpointManager(args.run_dir, keep_last=1)
    tag = args.tag or manager.latest_complete_tag()
    if tag is None or tag not in manager.complete_tags():
        raise ExportError(f"no complete checkpoint {tag or ''} in {Path(args.run_dir) / CHECKPOINT_SUBDIR} "
                          f"(complete: {', '.join(manager.complete_tags()) or 'none'})")
    out = export_checkpoint(manager.checkpoint_dir, tag, config, tokenizer, args.out, option="--out")
    return f"exported {tag} to {out}"

if __name__ == "__main__":
    sys.exit(main())
