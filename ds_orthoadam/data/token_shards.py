"""The on-disk format of pre-tokenised data, read by training and written by :mod:`ds_orthoadam.data.pretokenize`.

Layout of ``OUT/{split}/``: ``shard-NNNNN.bin`` (token ids of all documents back to back, uint16 or uint32, no
BOS/EOS), ``shard-NNNNN.offsets.npy`` (int64, document i = tokens[offsets[i]:offsets[i+1]]) and ``index.json``
(dtype, tokenizer, vocab size, BOS/EOS ids, per-shard counts). Opening a shard at any document is a slice of a
memory map. Kept apart from the writer so that reading sources never imports the tokenising CLI.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np

from .errors import DataSourceError

INDEX_FILE = "index.json"
INDEX_FORMAT = 1
REDO = "copy the directory again, or re-run python -m ds_orthoadam.data.pretokenize"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def read_index(directory: str) -> dict:
    """The index of a pre-tokenised split, refused unless it lists at least one shard (training indexes shard 0)."""
    path = os.path.join(directory, INDEX_FILE)
    try:
        with open(path) as handle:
            index = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataSourceError(f"cannot read the pre-tokenised index {path} ({error}); pre-tokenise again") from error
    if not isinstance(index, dict):
        raise DataSourceError(f"{path} is not a pre-tokenised index (a JSON object); pre-tokenise again")
    if index.get("format") != INDEX_FORMAT:
        raise DataSourceError(f"{path} has format {index.get('format')!r}, expected {INDEX_FORMAT}; pre-tokenise again")
    if not isinstance(index.get("shards"), list) or not index["shards"]:
        raise DataSourceError(f"{path} lists no shards; pre-tokenise again (python -m ds_orthoadam.data.pretokenize)")
    if not all(isinstance(shard, dict) for shard in index["shards"]):
        raise DataSourceError(f"{path} has shard entries that are not objects; pre-tokenise again")
    return index


class TokenShard:
    """One memory-mapped shard; ``documents(start)`` yields document arrays from document ``start`` on."""

    def __init__(self, path: str):
        directory, name = os.path.split(path)
        index = read_index(directory)
        dtype = DTYPES[index["dtype"]]
        try:
            self.tokens = np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else np.zeros(0, dtype)
            self.offsets = np.load(os.path.join(directory, name[: -len(".bin")] + ".offsets.npy"))
        except (OSError, ValueError) as error:
            raise DataSourceError(f"cannot read the token shard {path} ({error}); {REDO}") from error
        recorded = next((shard.get("num_tokens") for shard in index["shards"] if shard.get("tokens") == name), None)
        self._check_complete(path, recorded)

    def _check_complete(self, path: str, recorded: int | None) -> None:
        """A truncated or partly copied shard would otherwise yield empty or cut documents without a word."""
        offsets = self.offsets
        if offsets.ndim != 1 or not len(offsets) or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise DataSourceError(f"the document offsets of {path} are corrupt; {REDO}")
        if offsets[-1] != len(self.tokens) or (recorded is not None and recorded != len(self.tokens)):
            raise DataSourceError(f"{path} holds {len(self.tokens)} tokens, but its offsets / index.json say "
                                  f"{offsets[-1]} / {recorded} (a truncated or partial copy); {REDO}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def documents(self, start: int = 0) -> Iterator[np.ndarray]:
        for index in range(start, len(self)):
            yield self.tokens[self.offsets[index]: self.offsets[index + 1]]
