"""The one base class of every error a user can fix, and how a library's exception is quoted in its message.

Every command catches :class:`UserError` alone (:func:`ds_orthoadam.cli.run_main`), so a new kind of bad input only
needs a subclass, not an entry in each command's list. The trainer also needs to know who may report it: an error
that follows from the arguments and shared files hits every rank alike and is printed once, by rank 0; one that a
single rank can hit alone (its share of the data, its checkpoint shard, the export rank 0 writes) must be printed by
that rank, since the others only see its connection close. Subclasses say which with ``rank_specific``.
"""
from __future__ import annotations

from typing import ClassVar


class UserError(Exception):
    """Bad input the user can fix; the message names the problem and the fix."""

    rank_specific: ClassVar[bool] = False
    """True where a single rank can hit the error while the others do not."""


class OutputPathError(UserError):
    """An output directory that cannot be created or written: an existing file, or a read-only place."""

    rank_specific = True  # the trainer's export is written by rank 0 alone


def summary(error: BaseException) -> str:
    """``Type: first line`` of an exception raised inside a library, to quote in a one-line message."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
