"""A non-editable install has the default DeepSpeed configs: the wheel built from setup.py ships ``ds_configs/``
as ``ds_orthoadam.ds_configs``, and the package installed from it resolves every model's default config from
outside the repository, with the repository's content.

The wheel is built without network (``--no-build-isolation``: the venv's setuptools) and installed the way pip
does for a pure-Python wheel, by unpacking it; the package then imported from there, not from the repository,
uses the venv's own dependencies.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

RESOLVE_EVERY_DEFAULT_CONFIG = """
import json, sys
import ds_orthoadam
from ds_orthoadam import run_config
from ds_orthoadam.models import MODEL_SPECS
paths = {name: str(run_config.default_ds_config_path(name)) for name in MODEL_SPECS}
paths["variant orthoadam"] = str(run_config.variant_path("orthoadam"))
configs = {name: run_config.read_json(path) for name, path in paths.items()}
print(json.dumps({"package": ds_orthoadam.__file__, "paths": paths, "configs": configs}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the sources (setuptools leaves build/ behind, which must not go stale in the repo)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("ds_orthoadam", "ds_configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "-w", str(out), str(source)], check=True, capture_output=True, text=True)
    (built,) = out.glob("ds_orthoadam-*.whl")
    return built


def test_the_wheel_holds_every_config_of_the_repository(wheel):
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("ds_orthoadam/ds_configs/")}
    in_repo = {f"ds_orthoadam/ds_configs/{path.relative_to(REPO / 'ds_configs').as_posix()}"
               for path in (REPO / "ds_configs").rglob("*.json")}
    assert in_repo and in_repo <= shipped


def _check_every_default_config_resolves_from(package_root: Path, config_dir: Path, cwd: Path, prelude: str = ""):
    """Run RESOLVE_EVERY_DEFAULT_CONFIG (after ``prelude``) with ``package_root`` on the path, in ``cwd``: the package
    must be imported from there and every default config read from ``config_dir``, equal to the repository's file."""
    env = {**os.environ, "PYTHONPATH": str(package_root), "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, "-c", prelude + RESOLVE_EVERY_DEFAULT_CONFIG], cwd=cwd, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.splitlines()[-1])
    assert Path(found["package"]).is_relative_to(package_root)
    for name, path in found["paths"].items():
        assert Path(path).is_relative_to(config_dir), name
        repo_file = REPO / "ds_configs" / Path(path).relative_to(config_dir)
        assert found["configs"][name] == json.loads(repo_file.read_text(encoding="utf-8")), name


def test_an_installed_wheel_resolves_every_default_config_outside_the_repository(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    _check_every_default_config_resolves_from(site, site / "ds_orthoadam" / "ds_configs", workdir)


def test_a_source_tree_without_an_install_reads_the_configs_next_to_the_package(tmp_path):
    """``run_config``'s fallback: with no installed package data (``ds_orthoadam.ds_configs`` not importable), a copy
    of the sources on ``sys.path`` resolves every default config from its own top-level ``ds_configs/``."""
    source = tmp_path / "source"
    for name in ("ds_orthoadam", "ds_configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    # The venv's editable install maps ds_orthoadam.ds_configs onto the repository's folder: take its finder away.
    without_install = ("import sys\nsys.meta_path[:] = [finder for finder in sys.meta_path\n"
                       "                    if not getattr(finder, '__module__', '').startswith('__editable__')]\n")
    _check_every_default_config_resolves_from(source, source / "ds_configs", tmp_path, prelude=without_install)
