"""Read the documents of one file through HF datasets (streaming), starting at any document.

JSON lines that pyarrow cannot parse (malformed JSON, non-UTF-8 bytes, a missing ``text`` field) make datasets fail
the whole file; we then rescan that file line by line to name the first bad ``file:line`` and either fail (strict
mode) or skip the bad lines with one counted warning. The documents read before the failure keep their indices, so
resume positions stay valid. A ``text`` that parses but is not a string (a number, a list) is read as an empty
document on both paths (so it keeps its index), with a counted warning, or fails in strict mode. A truncated or
corrupt gzip file fails with its path.
"""
from __future__ import annotations

import gzip
import json
import logging
import warnings
import zlib
from typing import Iterator

import datasets
import pyarrow as pa

from .errors import LOCAL_C4_HINT, DataSourceError

logger = logging.getLogger(__name__)

READ_BATCH = 1024
_PARSE_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError, UnicodeDecodeError,
                 datasets.exceptions.DatasetGenerationError)
_CORRUPT_FILE_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)
NOT_A_STRING = "a 'text' that is not a string"


def _corrupt_file(path: str, error: Exception) -> DataSourceError:
    return DataSourceError(f"{path} cannot be decompressed ({type(error).__name__}: {error}): the file is truncated "
                           f"or corrupt; download or generate it again, or remove it from --data")


class _NonStringTexts:
    """Counts the lines of one file whose ``text`` is not a string: read as empty documents, or fatal in strict
    mode."""

    def __init__(self, path: str, strict: bool):
        self.path, self.strict, self.count, self.first = path, strict, 0, ""

    def empty_document(self, where: str, value: object) -> str:
        if self.strict:
            raise DataSourceError(f"{self.path}: {where} has {NOT_A_STRING} ({type(value).__name__}); fix or delete "
                                  f"that line, or run without --strict-data to read it as an empty document")
        self.count += 1
        self.first = self.first or where
        return ""

    def warn(self) -> None:
        if self.count:
            warnings.warn(f"read {self.count} line(s) of {self.path} with {NOT_A_STRING} as empty documents; first "
                          f"at {self.first}", stacklevel=3)


def _connection_hint(path: str, error: Exception) -> DataSourceError:
    return DataSourceError(f"cannot stream {path} from the hub ({error}); without network, {LOCAL_C4_HINT}")


def iter_json_documents(path: str, start: int = 0, strict: bool = False) -> Iterator[str]:
    """``text`` of each JSON line of ``path`` (json, json.gz, jsonl; local or ``hf://``) from document ``start``."""
    yielded, non_strings = 0, _NonStringTexts(path, strict)
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
                if text is not None and not isinstance(text, str):
                    text = non_strings.empty_document(f"document {start + yielded - 1}", text)
                yield text or ""
        non_strings.warn()
    except ConnectionError as error:
        raise _connection_hint(path, error) from error
    except _CORRUPT_FILE_ERRORS as error:
        raise _corrupt_file(path, error) from error
    except StopIteration as error:  # datasets' json loader, given a compressed file with no content
        raise DataSourceError(f"{path} holds no JSON lines; remove it from --data or generate it again") from error
    except _PARSE_ERRORS as error:
        if path.startswith("hf://"):
            raise
        yield from _recover_json_lines(path, start + yielded, strict, error)


def _recover_json_lines(path: str, start: int, strict: bool, error: Exception) -> Iterator[str]:
    """Re-read ``path`` line by line after datasets rejected it: skip (or, strict, fail on) the bad lines."""
    opener = gzip.open if path.endswith(".gz") else open
    index, bad, first_bad, non_strings = 0, 0, None, _NonStringTexts(path, strict)
    with opener(path, "rb") as handle:
        for line_number, raw in _numbered_lines(handle, path):
            if not raw.strip():
                continue
            problem, text = _parse_json_line(raw)
            if problem == NOT_A_STRING:
                problem, text = None, non_strings.empty_document(f"line {line_number}", text)
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
    non_strings.warn()
    if not bad and not non_strings.count:
        raise DataSourceError(f"{path}: HF datasets cannot read this file ({error}) though every line is valid "
                              f"JSON with a 'text' string; check the file's format") from error
    if bad:
        warnings.warn(f"skipped {bad} malformed JSON line(s) in {path}; first at {first_bad}", stacklevel=2)


def _numbered_lines(handle, path: str) -> Iterator[tuple[int, bytes]]:
    try:
        yield from enumerate(handle, start=1)
    except _CORRUPT_FILE_ERRORS as error:
        raise _corrupt_file(path, error) from error


def _parse_json_line(raw: bytes) -> tuple[str | None, object]:
    """``(problem, text)``: problem None for a good line, NOT_A_STRING (text: the value) for a non-string text."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return f"bytes that are not UTF-8 (at byte {err.start}); re-encode the file as UTF-8", ""
    except json.JSONDecodeError as err:
        return f"malformed JSON ({err.msg}, column {err.colno})", ""
    if not isinstance(record, dict):
        return "not a JSON object with a 'text' field", ""
    text = record.get("text")
    if text is not None and not isinstance(text, str):
        return NOT_A_STRING, text
    return None, text or ""


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
