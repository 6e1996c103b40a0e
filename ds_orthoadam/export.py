"""Export a training checkpoint to a Hugging Face model directory (config, safetensors weights, tokenizer).

The weights come from the checkpoint's fp32 master copy, not from the (possibly fp16) training module: for a
mixed-precision run that is the precise model. The config records the attention implementation
(``attn_implementation``), so the directory reloads with softmax-1 through::

    import ds_orthoadam
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(directory)

Runs on the CPU in one process from the checkpoint files alone (no launcher, any world size), both at the end of
training and on demand: ``python -m ds_orthoadam.export --run-dir OUT [--tag TAG] --out DIR``.
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
from ds_orthoadam.cli_errors import report_error, summary
from ds_orthoadam.data import DataError, load_tokenizer
from ds_orthoadam.models import build_config
from ds_orthoadam.zero_orthoadam import export_fp32_state_dict


class ExportError(RuntimeError):
    """A run directory or checkpoint that cannot be exported; the message says why."""


def export_checkpoint(checkpoint_dir: str | os.PathLike, tag: str, config: PreTrainedConfig, tokenizer,
                      out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer files) from checkpoint ``tag``."""
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
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


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
    run = json.loads(run_file.read_text(encoding="utf-8"))
    return build_config(**run["model_args"]), run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_orthoadam.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="output directory of a ds-orthoadam-train run")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete checkpoint)")
    parser.add_argument("--out", required=True, help="directory to write the Hugging Face model to")
    args = parser.parse_args(argv)
    try:
        config, run = run_model_config(args.run_dir)
        manager = CheckpointManager(args.run_dir, keep_last=1)
        tag = args.tag or manager.latest_complete_tag()
        if tag is None or tag not in manager.complete_tags():
            raise ExportError(f"no complete checkpoint {tag or ''} in {Path(args.run_dir) / CHECKPOINT_SUBDIR} "
                              f"(complete: {', '.join(manager.complete_tags()) or 'none'})")
        out = export_checkpoint(manager.checkpoint_dir, tag, config, load_tokenizer(run["tokenizer"]), args.out)
    except (ExportError, DataError) as error:
        return report_error(error)
    print(f"exported {tag} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
