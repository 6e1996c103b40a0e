"""Output directories of every ds-orthoadam command, checked before any work is done.

``os.makedirs`` on a path that is a file, or under an unwritable parent, raises a bare FileExistsError /
NotADirectoryError traceback, and some writers (``save_pretrained``) only log and write nothing; this turns each of
those into one :class:`OutputPathError` that names the path and the fix.
"""
from __future__ import annotations

import os
from pathlib import Path

from ds_orthoadam.cli_errors import summary
from .errors import OutputPathError


def ensure_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Create directory ``path`` (with its parents) and return it; refuse a file or a place that cannot be written.

    ``option`` is the command-line option the path came from, so the message says which argument to change."""
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
