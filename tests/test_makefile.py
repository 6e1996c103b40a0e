"""`make help` lists every target the Makefile documents with a `## target:` comment, and each is a real target.

The second half is checked against make's own rule database (`make -p`), an independent reading of the Makefile.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def _documented_targets() -> list[str]:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return re.findall(r"^## ([^\s:]+):", text, flags=re.MULTILINE)


def test_make_help_lists_every_documented_target():
    documented = _documented_targets()
    assert {"setup", "test", "demo", "help"} <= set(documented)
    out = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert listed == documented


def test_documented_targets_are_real_targets():
    database = subprocess.run(["make", "-pRrq", ":"], cwd=REPO, capture_output=True, text=True).stdout
    rules = set(re.findall(r"^([^\s#:=]+):", database, flags=re.MULTILINE))
    for target in _documented_targets():
        concrete = target.replace("<model>", "llama-60m")
        assert concrete in rules, f"`## {target}:` documents a target the Makefile does not define"


def test_make_train_llama_7b_runs_deepspeed_on_the_zero3_model(corpus, tokenizer_dir, tmp_path):
    """`make train-llama-7b` for real, with a venv whose `deepspeed` records its command line: the launch script's
    one-process pre-flight (--check-only) accepts llama-7b's ZeRO-3 config for NUM_GPUS=16 ranks (its batch
    arithmetic: 512 = 4 x 8 x 16), then the launcher gets NUM_GPUS, the trainer module and the model with make's
    defaults (softmax-1 + OrthoAdam) and the caller's data, tokenizer and run directory."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()  # newer than setup.py: make's setup prerequisite is up to date
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    record = tmp_path / "deepspeed.args"
    (venv / "bin" / "deepspeed").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}"\n')
    for tool in ("python", "deepspeed"):
        (venv / "bin" / tool).chmod(0o755)
    run_dir = tmp_path / "run"
    result = subprocess.run(
        ["make", "--no-print-directory", "train-llama-7b", f"VENV={venv}", "NUM_GPUS=16", f"TRAIN_DATA={corpus['dir']}",
         f"TRAIN_TOKENIZER={tokenizer_dir}", f"RUN_DIR={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MASTER_PORT": "29517"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert record.read_text().splitlines() == [
        "--num_gpus", "16", "--master_port", "29517", "--module", "ds_orthoadam.train", "--model", "llama-7b",
        "--attention", "softmax1", "--optimizer", "orthoadam", "--data", corpus["dir"], "--tokenizer", tokenizer_dir,
        "--output-dir", str(run_dir)]


def test_make_n_train_llama_7b_prints_the_launch_command():
    """`make -n train-llama-7b`: the 7B target exists through the train-% pattern and runs the single-node launch
    script with the model and make's defaults (8 GPUs, softmax-1 + OrthoAdam, C4, runs/llama-7b-softmax1-orthoadam)."""
    dry_run = subprocess.run(["make", "--no-print-directory", "-n", "-o", "setup", "-o", ".venv/.installed",
                              "train-llama-7b"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    command = " ".join(dry_run.replace("\\\n", " ").split())  # make -n keeps the recipe's line continuations
    assert command == ("NUM_GPUS=8 VENV=.venv launch/train_single_node.sh llama-7b --attention softmax1 --optimizer "
                       "orthoadam --data c4 --tokenizer data/c4/tokenizer --output-dir runs/llama-7b-softmax1-orthoadam")
