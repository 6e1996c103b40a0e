"""Exceptions of the data pipeline: every bad input ends in one of these, with a message that names the fix."""
from ds_orthoadam.errors import UserError

LOCAL_C4_HINT = (
    "download the C4 'en' shards (c4-train.*-of-01024.json.gz, c4-validation.*-of-00008.json.gz from "
    "https://huggingface.co/datasets/allenai/c4/tree/main/en) and pass --data /path/to/that/directory"
)
"""The fix for every C4-from-the-hub failure (offline mode, no network): local shards."""


class DataError(UserError):
    """Base class: a data problem the user can fix (the message says how). Each rank reads its own share of the
    data, so one rank can hit it alone (a truncated shard, an empty share)."""

    rank_specific = True


class DataSourceError(DataError):
    """A --data / --val-data source that cannot be read: missing path, no shards, empty or malformed file."""


class DataArgumentError(DataSourceError):
    """A --data / --val-data argument that names nothing usable (a missing path, a glob without matches, a
    directory without shards, an empty file): every rank resolves the argument alike, so rank 0 reports it."""

    rank_specific = False


class TokenizerError(DataError):
    """A tokenizer that cannot be trained, loaded or used with this model: every rank loads the same one."""

    rank_specific = False
