"""The DeepSpeed log lines ds_orthoadam/ds_logging.py drops are the ones the installed DeepSpeed writes, and they are
gone once ``ds_orthoadam`` is imported. If DeepSpeed rewords one, the first half of a test here fails: update NOISE.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from deepspeed.runtime.lr_schedules import WarmupCosineLR

import ds_orthoadam  # noqa: F401  (installs the filter)
from ds_orthoadam import ds_logging


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _scheduler_start_messages(filtered: bool) -> list[str]:
    logger = logging.getLogger(ds_logging.DEEPSPEED_LOGGER)
    installed = list(logger.filters)
    records = _Records()
    logger.addHandler(records)
    if not filtered:
        logger.filters.clear()
    try:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        WarmupCosineLR(optimizer, total_num_steps=10, warmup_num_steps=2)
    finally:
        logger.removeHandler(records)
        logger.filters[:] = installed
    return records.messages


def test_the_scheduler_start_warning_is_deepspeeds_and_is_dropped():
    assert ds_logging.NOISE[1] in _scheduler_start_messages(filtered=False)
    assert ds_logging.NOISE[1] not in _scheduler_start_messages(filtered=True)


def _import_output(module: str) -> str:
    env = {name: value for name, value in os.environ.items() if name != "DS_ACCELERATOR"}
    result = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed only logs its CPU fallback where there is no GPU")
def test_the_cpu_accelerator_notice_is_deepspeeds_and_is_dropped():
    assert ds_logging.NOISE[0] in _import_output("deepspeed")
    assert ds_logging.NOISE[0] not in _import_output("ds_orthoadam")
