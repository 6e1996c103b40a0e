"""DeepSpeed config of a training run: a per-size JSON from ``ds_configs/`` plus small overrides, validated.

A run's config is composed, never copied: ``ds_configs/<model>.json`` (the paper's setup for that size) deep-merged
with zero or more override files (``ds_configs/variants/orthoadam.json`` selects the optimiser variant) and then
``--set dotted.key=value`` edits (e.g. ``scheduler.params.total_num_steps=100`` for a shortened run). The attention
variant is a model option (``--attention``), not a DeepSpeed setting.

Validation happens here, before any process group or model exists, so that a bad batch arithmetic or a missing file
is one clear message instead of a DeepSpeed assertion on every rank.
"""
from __future__ import annotations

import copy
import json
import numbers
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

from ds_orthoadam.errors import UserError, summary



def _shipped_config_dir() -> Path:
    """``ds_configs/``: the repository's top-level folder, installed as the package data ``ds_orthoadam.ds_configs``
    (setup.py maps the one onto the other), so that a wheel install (``pip install .``) has the default configs too.
    A source tree on ``sys.path`` without any install reads the folder next to the package."""
    try:
        return Path(str(resources.files("ds_orthoadam.ds_configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "ds_configs"


DS_CONFIG_DIR = _shipped_config_dir()
VARIANT_DIR = DS_CONFIG_DIR / "variants"
SCHEDULER_TYPE = "WarmupCosineLR"


class RunConfigError(UserError, ValueError):
    """A DeepSpeed config (or override) that cannot be used; the message names the problem and the fix."""


CPU_CONFIGS = {"-tiny": "cpu.json", "-testbed": "testbed.json"}


def default_ds_config_path(model_name: str) -> Path:
    """``ds_configs/<model_name>.json``: the paper's setup for that model size; the fp32 two-CPU-rank configs for the
    models that exist for CPUs: ``cpu.json`` for the ``*-tiny`` models (tests), ``testbed.json`` for the
    ``*-testbed`` ones (the testbed's learning rate and schedule, see docs/testbed.md)."""
    suffix = next((suffix for suffix in CPU_CONFIGS if model_name.endswith(suffix)), None)
    return DS_CONFIG_DIR / (CPU_CONFIGS[suffix] if suffix else f"{model_name}.json")


def variant_path(name: str) -> Path:
    """``ds_configs/variants/<name>.json`` (e.g. ``orthoadam``): a small override applied on top of a size config."""
    return VARIANT_DIR / f"{name}.json"


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``, or a RunConfigError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise RunConfigError(f"config file {path} does not exist; pass an existing JSON file "
                             f"(per-size configs are in {DS_CONFIG_DIR})")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunConfigError(f"config file {path} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise RunConfigError(f"config file {path} must hold a JSON object, not {type(value).__name__}")
    return value


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in: nested objects merge key by key, every other value is replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_assignment(assignment: str) -> dict:
    """``"a.b.c=VALUE"`` -> ``{"a": {"b": {"c": VALUE}}}``; VALUE is parsed as JSON when it is JSON, else a string."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RunConfigError(f"--set {assignment!r} is not of the form dotted.key=value "
                             "(e.g. scheduler.params.total_num_steps=100)")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def compose_ds_config(base: str | os.PathLike, override_files: list = (), assignments: list[str] = ()) -> dict:
    """The merged config: ``base`` JSON, then each override file in order, then each ``--set`` assignment."""
    config = read_json(base)
    for override in override_files:
        config = deep_merge(config, read_json(override))
    for assignment in assignments:
        config = deep_merge(config, parse_assignment(assignment))
    return config


def _positive_int(config: dict, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise RunConfigError(f"{key} must be a positive integer in the DeepSpeed config, got {value!r}")
    return value


def gradient_accumulation_steps(config: dict, world_size: int) -> int:
    """Accumulation steps implied by the config on ``world_size`` data-parallel ranks, checked for consistency.

    DeepSpeed requires train_batch_size == micro_batch x accumulation x world_size; it fails with an assertion
    deep inside initialize otherwise. We check the same identity up front and say which number to change.
    """
    batch = _positive_int(config, "train_batch_size")
    micro = _positive_int(config, "train_micro_batch_size_per_gpu")
    per_step = micro * world_size
    if "gradient_accumulation_steps" in config:
        accumulation = _positive_int(config, "gradient_accumulation_steps")
        if batch != per_step * accumulation:
            raise RunConfigError(
                f"inconsistent batch arithmetic: train_batch_size={batch} but train_micro_batch_size_per_gpu={micro}"
                f" x gradient_accumulation_steps={accumulation} x world_size={world_size} = {per_step * accumulation}"
                "; remove gradient_accumulation_steps (it is derived) or make the product match")
        return accumulation
    if batch % per_step:
        raise RunConfigError(
            f"inconsistent batch arithmetic: train_batch_size={batch} is not divisible by "
            f"train_micro_batch_size_per_gpu={micro} x world_size={world_size} = {per_step}; change the micro batch "
            f"(--set train_micro_batch_size_per_gpu=N) or the number of ranks so that it divides {batch}")
    return batch // per_step


def scheduler_steps(config: dict) -> tuple[int, int]:
    """(warmup_num_steps, total_num_steps) of the config's WarmupCosineLR, which the trainer requires."""
    scheduler = config.get("scheduler")
    if not isinstance(scheduler, dict) or scheduler.get("type") != SCHEDULER_TYPE:
        raise RunConfigError(f"the DeepSpeed config must have a \"scheduler\" of type {SCHEDULER_TYPE} "
                             f"(the paper's linear warmup + cosine decay), got {scheduler!r}")
    params = scheduler.get("params", {})
    warmup, total = params.get("warmup_num_steps"), params.get("total_num_steps")
    for name, value in (("warmup_num_steps", warmup), ("total_num_steps", total)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise RunConfigError(f"scheduler.params.{name} must be a positive integer, got {value!r}")
    if warmup >= total:
        raise RunConfigError(f"scheduler.params.warmup_num_steps={warmup} must be below total_num_steps={total}")
    return warmup, total


def optimizer_type(config: dict) -> str:
    """The optimiser name of the config (``AdamW``, ``OrthoAdam``, ...)."""
    optimizer = config.get("optimizer")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("type"), str):
        raise RunConfigError("the DeepSpeed config must have an \"optimizer\" section with a \"type\" "
                             "(AdamW, or OrthoAdam via ds_configs/variants/orthoadam.json)")
    return optimizer["type"]


def section(config: dict, name: str, example: str = "enabled=true") -> dict:
    """The config's ``name`` section ({} when absent), which must be a JSON object (``--set fp16=true`` is not);
    ``example`` is a ``key=value`` inside it for the message."""
    value = config.get(name, {})
    if not isinstance(value, dict):
        raise RunConfigError(f"{name} must be a JSON object in the DeepSpeed config, e.g. --set {name}.{example}, "
                             f"got {value!r}")
    return value


def is_number(value: Any) -> bool:
    """A real number as a config value (bool is an int in Python, but ``true`` is not a number in a config)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def zero_stage(config: dict) -> int:
    """The config's ZeRO stage (0 when absent); 3 partitions the parameters themselves."""
    check_zero_stage(config)
    return section(config, "zero_optimization").get("stage", 0)


def check_zero_stage(config: dict) -> None:
    """zero_optimization must be an object whose stage (default 0) is 0..3: DeepSpeed fails on anything else with a
    pydantic dump or a TypeError deep inside initialize."""
    stage = section(config, "zero_optimization", example="stage=1").get("stage", 0)
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in range(4):
        raise RunConfigError(f"zero_optimization.stage must be an integer 0, 1, 2 or 3, got {stage!r} "
                             "(e.g. --set zero_optimization.stage=1)")


def check_gradient_clipping(config: dict) -> None:
    """gradient_clipping must be present (DeepSpeed 0.19 silently defaults it to 1.0) and a number >= 0 (0: off)."""
    if "gradient_clipping" not in config:
        raise RunConfigError("gradient_clipping must be set explicitly (DeepSpeed 0.19 silently defaults it to 1.0)")
    value = config["gradient_clipping"]
    if not is_number(value) or not value >= 0:
        raise RunConfigError(f"gradient_clipping must be a number >= 0 (0 turns clipping off), got {value!r} "
                             "(e.g. --set gradient_clipping=1.0)")


def check_learning_rate(config: dict) -> None:
    """optimizer.params, where given, must be an object and its lr a number: DeepSpeed's optimisers fail on a
    string with a TypeError at the first step, not at start-up."""
    params = config["optimizer"].get("params", {})
    if not isinstance(params, dict):
        raise RunConfigError(f"optimizer.params must be a JSON object, e.g. --set optimizer.params.lr=0.001, "
                             f"got {params!r}")
    if "lr" in params and not is_number(params["lr"]):
        raise RunConfigError(f"optimizer.params.lr must be a number, got {params['lr']!r} "
                             "(e.g. --set optimizer.params.lr=0.001)")


def validate(config: dict, world_size: int) -> None:
    """Every check the trainer relies on: batch arithmetic, scheduler, optimiser and its lr, ZeRO stage, explicit
    clipping and fp16 scale (the values DeepSpeed would otherwise reject with a traceback on every rank)."""
    gradient_accumulation_steps(config, world_size)
    scheduler_steps(config)
    optimizer_type(config)
    check_learning_rate(config)
    check_zero_stage(config)
    check_gradient_clipping(config)
    fp16 = section(config, "fp16")
    if fp16.get("enabled") and "initial_scale_power" not in fp16:
        raise RunConfigError("fp16.initial_scale_power must be set explicitly (DeepSpeed otherwise starts the "
                             "dynamic loss scale at 2^32 instead of the documented 2^16)")


def _dotted_keys(config: dict, prefix: str = "") -> list[str]:
    """Every key of ``config`` as a dotted path (``zero_optimization.stage``), parents before children."""
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys.extend(_dotted_keys(value, f"{prefix}{key}."))
    return keys


def likely_field(message: str, config: dict) -> str | None:
    """The config field a DeepSpeed error message is most likely about: the deepest dotted key whose last part the
    message names as a word (DeepSpeed's messages name fields but not their sections)."""
    named = [key for key in _dotted_keys(config)
             if re.search(rf"(?<![\w.]){re.escape(key.rsplit('.', 1)[-1])}(?!\w)", message)]
    return max(named, key=lambda key: key.count("."), default=None)


def deepspeed_error_message(error: BaseException, config: dict) -> str:
    """One line for an error DeepSpeed raised while building the engine from ``config`` (values that pass
    :func:`validate` but that DeepSpeed or the device refuse), naming the likely field and the fix."""
    for precision in ("fp16", "bf16"):
        if f"{precision} is not supported on your device" in str(error):
            return (f"DeepSpeed cannot train in {precision} on this device ({summary(error)}); on a CPU pass "
                    f"--ds-config ds_configs/cpu.json or --set {precision}.enabled=false")
    field = likely_field(str(error), config)
    where = f"check {field}" if field else "check the values set by --ds-config, --ds-override and --set"
    return f"DeepSpeed rejected the config ({summary(error)}); {where} in the DeepSpeed config"


def with_run_monitors(config: dict, run_dir: str | os.PathLike) -> dict:
    """``config`` with DeepSpeed's monitors writing into the run directory (rank 0 only): TensorBoard always, to
    ``run_dir/tensorboard/<run name>``; the csv monitor, where the config enables it, to ``run_dir/csv/<run name>``
    (a resume truncates both to the checkpoint's step, so they must belong to the run)."""
    run_dir = Path(run_dir)
    monitors = {"tensorboard": {"enabled": True, "output_path": str(run_dir / "tensorboard"), "job_name": run_dir.name}}
    if section(config, "csv_monitor").get("enabled"):
        monitors["csv_monitor"] = {"output_path": str(run_dir / "csv"), "job_name": run_dir.name}
    return deep_merge(config, monitors)
