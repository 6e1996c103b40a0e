"""How every ds-orthoadam command reports bad input: one line on standard error naming the problem and the fix (the
exception's message carries both) and exit status 2, argparse's own status for bad arguments."""
from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2


def summary(error: BaseException) -> str:
    """``Type: first line`` of an exception raised inside a library, to quote in a one-line message."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def report_error(error: BaseException | str, exit_code: int = EXIT_BAD_INPUT) -> int:
    """Print ``error: <message>`` to standard error and return ``exit_code`` (for ``main`` to return)."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    return exit_code


def integer_at_least(minimum: int):
    """argparse type: an integer of at least ``minimum``, so that a bad count is argparse's one-line usage error
    (exit 2) instead of a traceback where the value is first used."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    return parse
