"""DeepSpeed log lines that tell a user of this package nothing, dropped at DeepSpeed's logger.

* ``Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.``: logged while
  ``import deepspeed`` runs, on every command (``--help`` included) of a machine without a GPU. Where training on
  the CPU is a mistake, the fp16 configs fail with an error that names the CPU config instead.
* ``Attempting to get learning rate from scheduler before it has started``: logged by the constructor of
  ``WarmupCosineLR`` (``lr_schedules.py``), which computes its start rates before its first step, at every
  training start.

DeepSpeed's logger is ``logging.getLogger("DeepSpeed")``; it keeps filters added before DeepSpeed configures it, so
:func:`drop_deepspeed_noise` must run before the first ``import deepspeed`` (``ds_orthoadam/__init__.py`` calls it
first). ``tests/test_ds_logging.py`` checks both lines against the installed DeepSpeed.
"""
from __future__ import annotations

import logging

DEEPSPEED_LOGGER = "DeepSpeed"
NOISE = (
    "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
    "Attempting to get learning rate from scheduler before it has started",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in NOISE


def drop_deepspeed_noise() -> None:
    """Install the filter on DeepSpeed's logger (idempotent)."""
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    if not any(isinstance(existing, _DropNoise) for existing in logger.filters):
        logger.addFilter(_DropNoise())
