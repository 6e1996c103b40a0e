"""What every ds-orthoadam command shares: one error line and exit status 2 for bad input, argument types that
refuse bad counts in argparse, and output directories checked before any work is done.

Bad input gets one line on standard error naming the problem and the fix (the :class:`UserError`'s message carries
both) and exit status 2, argparse's own status for bad arguments, instead of a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from ds_orthoadam.errors import OutputPathError, UserError, summary

EXIT_BAD_INPUT = 2


def report_error(error: BaseException | str, exit_code: int = EXIT_BAD_INPUT) -> int:
    """Print ``error: <message>`` to standard error and return ``exit_code`` (for ``main`` to return)."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    return exit_code


def run_main(command: Callable[[], str | None]) -> int:
    """Run a command's work: its result line (if any) is printed and the exit status is 0; a :class:`UserError`
    is one error line and exit status 2. Anything else is a bug and keeps its traceback."""
    try:
        done = command()
    except UserError as error:
        return report_error(error)
    if done:
        print(done)
    return 0


def integer_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer of at least ``minimum``, so that a bad count is argparse's one-line usage error
    (exit 2) instead of a traceback where the value is first used."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    return parse


def positive_number(text: str) -> float:
    """argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def ensure_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Create directory ``path`` (with its parents) and return it; refuse a file or a place that cannot be written.

    ``os.makedirs`` on a path that is a file, or under an unwritable parent, raises a bare FileExistsError /
    NotADirectoryError traceback, and some writers (``save_pretrained``) only log and write nothing; this turns each
    of those into one :class:`OutputPathError`. ``option`` is the command-line option the path came from, so the
    message says which argument to change."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{option} {path} is an existing file, not a directory; pass a directory path "
                              "(new or existing), or move the file away")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputPathError(f"cannot create the output directory {option} {path} ({summary(error)}); pass a "
                              "directory in a writable location") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputPathError(f"the output directory {option} {path} is not writable; pass a directory in a "
                              "writable location")
    return path
