"""Exceptions of the data pipeline: every bad input ends in one of these, with a message that names the fix."""


class DataError(Exception):
    """Base class: a data problem the user can fix (the message says how)."""


class DataSourceError(DataError):
    """A --data / --val-data argument that cannot be read: missing path, no shards, empty or malformed file."""


class TokenizerError(DataError):
    """A tokenizer that cannot be trained, loaded or used with this model."""


class OutputPathError(DataError):
    """An output directory that cannot be created or written: an existing file, or a read-only place."""
