"""`make help` lists every target the Makefile documents with a `## target:` comment, and each is a real target.

The second half is checked against make's own rule database (`make -p`), an independent reading of the Makefile.
"""
from __future__ import annotations

import re
import shutil
import subprocess
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
