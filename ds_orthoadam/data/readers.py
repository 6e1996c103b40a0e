"""Read the documents of one file through HF datasets (streaming), starting at any document.

JSON lines that pyarrow cannot parse (malformed JSON, non-UTF-8 bytes, a missing ``text`` field) make datasets fail
the whole file; we then rescan that file line by line to name the first bad ``file:line`` and either fail (strict
mode) or skip the bad lines with one counted warning. The documents read before the failure keep their indices, so
resume positions stay valid.
"""
from __future__ import annotations

import gzip
import json
import logging
import warnings
from typing import Iterator

import datasets
import pyarrow as pa

from .errors import DataSourceError

logger = logging.getLogger(__name__)

READ_BATCH = 1024
_PARSE_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError, UnicodeDecodeError,
                 datasets.exceptions.DatasetGenerationError)


def _connection_hint(path: str, error: Exception) -> DataSourceError:
    from .sources import LOCAL_C4_HINT

    return DataSourceError(f"cannot stream {path} from the hub ({error}); without network, {LOCAL_C4_HINT}")


def iter_json_documents(path: str, start: int = 0, strict: bool = False) -> Iterator[str]:
    """``text`` of each JSON line of ``path`` (json, json.gz, jsonl; local or ``hf://``) from document ``start``."""
    yielded = 0
    try:
        dataset = datasets.load_dataset("json", data_files=[path], split="train", streaming=True)
        if dataset.column_names is not None and "text" not in dataset.column_names:
            raise DataSourceError(
                f"{path}: JSON lines have no 'text' field (fields: {', '.join(dataset.column_names)}); C4 format "
                f"is one object per line with 'text' (and 'timestamp', 'url')"
            )
        for batch in dataset.select_columns(["text"]).skip(start).iter(batch_size=READ_BATCH):
            for text in batch["text"]:
                yielded += 1
                yield text or ""
    except ConnectionError as error:
        raise _connection_hint(path, error) from error
    except _PARSE_ERRORS as error:
        if path.startswith("hf://"):
            raise
        yield from _recover_json_lines(path, start + yielded, strict, error)


def _recover_json_lines(path: str, start: int, strict: bool, error: Exception) -> Iterator[str]:
    """Re-read ``path`` line by line after datasets rejected it: skip (or, strict, fail on) the bad lines."""
    opener = gzip.open if path.endswith(".gz") else open
    index, bad, first_bad = 0, 0, None
    with opener(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            problem, text = _parse_json_line(raw)
            if problem:
                if strict:
                    raise DataSourceError(
                        f"{path}:{line_number}: {problem}. Fix or delete that line, or run without --strict-data "
                        f"to skip malformed lines with a warning"
                    ) from error
                bad += 1
                first_bad = first_bad or f"{path}:{line_number} ({problem})"
                continue
            if index >= start:
                yield text
            index += 1
    if not bad:
        raise DataSourceError(f"{path}: HF datasets cannot read this file ({error}) though every line is valid "
                              f"JSON with a 'text' string; check the file's format") from error
    warnings.warn(f"skipped {bad} malformed JSON line(s) in {path}; first at {first_bad}", stacklevel=2)


def _parse_json_line(raw: bytes) -> tuple[str | None, str]:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return f"bytes that are not UTF-8 (at byte {err.start}); re-encode the file as UTF-8", ""
    except json.JSONDecodeError as err:
        return f"malformed JSON ({err.msg}, column {err.colno})", ""
    if not isinstance(record, dict) or not isinstance(record.get("text", ""), (str, type(None))):
        return "not an object with a 'text' string", ""
    return None, record.get("text") or ""


def iter_text_documents(path: str, start: int = 0) -> Iterator[str]:
    """Paragraphs (blank-line separated) of a UTF-8 text file, from paragraph ``start`` on."""
    dataset = datasets.load_dataset("text", data_files=[path], split="train", streaming=True, sample_by="paragraph")
    try:
        for batch in dataset.skip(start).iter(batch_size=READ_BATCH):
            yield from batch["text"]
    except UnicodeDecodeError as error:
        raise DataSourceError(
            f"{path} is not UTF-8 text (byte {error.object[error.start:error.start + 1]!r} at offset "
            f"{error.start} of a read chunk); convert it, e.g. iconv -f latin1 -t utf-8 {path} > fixed.txt"
        ) from error
