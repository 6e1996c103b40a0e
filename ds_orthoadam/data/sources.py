"""Turn one ``--data`` string into a list of document shards, and open a shard at any document.

Accepted strings (see docs/data.md):

* ``c4`` (or ``allenai/c4``): the C4 ``en`` config streamed from the Hugging Face hub (1024 train / 8 validation
  json.gz shards, read through HF datasets' json loader with ``hf://`` paths).
* a directory: C4-format shards named ``c4-{split}.*.json[.gz]`` / ``*.jsonl``, or a pre-tokenised directory
  (``{split}/index.json``, see :mod:`ds_orthoadam.data.token_shards`).
* files or globs (comma-separated) of ``*.json``, ``*.json.gz``, ``*.jsonl[.gz]`` (C4 format: one JSON object per line
  with a ``text`` field) or ``*.txt`` (one document per blank-line-separated paragraph).

A shard is the unit of rank sharding and of resume: :meth:`DataSource.open_shard` starts at a document index, so a
resumed stream reads only the shard it stopped in.
"""
from __future__ import annotations

import glob
import gzip
import os
import zlib
from dataclasses import dataclass
from itertools import islice
from typing import Iterator, Literal

import numpy as np

from .errors import LOCAL_C4_HINT, DataArgumentError
from .readers import iter_json_documents, iter_text_documents
from .token_shards import TokenShard, read_index

Split = Literal["train", "validation"]

HUB_ALIASES = ("c4", "allenai/c4", "c4/en", "allenai/c4/en")
C4_HUB_SHARDS = {"train": 1024, "validation": 8}
JSON_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")
TEXT_SUFFIXES = (".txt",)
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class DataSource:
    """An ordered list of document shards of one split.

    kind is ``json`` (C4 format, local or hub), ``text`` (plain text) or ``tokens`` (pre-tokenised).
    ``documents`` are str for json/text shards and 1-D integer arrays (token ids, no BOS/EOS) for token shards.
    """

    name: str
    kind: Literal["json", "text", "tokens"]
    shards: tuple[str, ...]
    strict: bool = False

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def is_hub(self) -> bool:
        return self.shards[0].startswith("hf://")

    def open_shard(self, index: int, start_doc: int = 0) -> Iterator[str | np.ndarray]:
        """Documents of shard ``index`` from document ``start_doc`` on (earlier ones are skipped, not tokenised)."""
        path = self.shards[index]
        if self.kind == "tokens":
            return TokenShard(path).documents(start_doc)
        if self.is_hub:
            require_online(self.name)
        if self.kind == "json":
            return iter_json_documents(path, start_doc, strict=self.strict)
        return iter_text_documents(path, start_doc)

    def documents(self, limit: int | None = None) -> Iterator[str | np.ndarray]:
        """All documents in shard order (no shuffling), at most ``limit``: what validation and samplers read."""
        docs = (doc for index in range(self.num_shards) for doc in self.open_shard(index))
        return islice(docs, limit)

    def token_index(self) -> dict | None:
        """The pre-tokenised index (vocab size, BOS/EOS ids) for kind ``tokens``, else None."""
        if self.kind != "tokens":
            return None
        return read_index(os.path.dirname(self.shards[0]))


def offline_requested() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARIABLES)


def require_online(name: str) -> None:
    """Fail at once (not after a 20 s network timeout) when a hub source is used in offline mode."""
    if offline_requested():
        raise DataArgumentError(
            f"--data {name} streams C4 from the Hugging Face hub, but offline mode is on "
            f"({', '.join(v for v in OFFLINE_VARIABLES if os.environ.get(v))} set). Use local shards instead: "
            f"{LOCAL_C4_HINT}. For a quick try without any download: make demo-data, then --data data/demo."
        )


def resolve_source(data: str, split: Split = "train", strict: bool = False) -> DataSource:
    """Resolve a ``--data`` string into the shards of ``split``.

    Directories and ``c4`` have splits; files and globs are taken as given, whatever ``split`` is (use
    :func:`validation_source` to derive a validation split from a training argument).
    ``strict``: fail on the first malformed JSON line instead of skipping it with a counted warning.
    """
    data = data.strip()
    if not data:
        raise DataArgumentError("--data is empty; pass c4, a directory of C4 shards, or json/json.gz/jsonl/txt files")
    if data.lower() in HUB_ALIASES:
        require_online(data)
        count = C4_HUB_SHARDS[split]
        shards = tuple(
            f"hf://datasets/allenai/c4/en/c4-{split}.{i:05d}-of-{count:05d}.json.gz" for i in range(count)
        )
        return DataSource(f"c4 ({split})", "json", shards, strict)
    if os.path.isdir(data):
        return _resolve_directory(data, split, strict)
    return _resolve_files(data, strict)


def validation_source(data: str, val_data: str | None = None, strict: bool = False) -> DataSource:
    """The validation source: ``val_data`` if given, else derived from the training ``data`` argument.

    Derivation works for ``c4``, directories with c4-validation shards or a validation/ index, and explicit
    ``c4-train.*`` files next to ``c4-validation.*`` files; anything else must be named explicitly, so that a
    run never silently validates on its training text.
    """
    if val_data:
        return resolve_source(val_data, "validation", strict)
    if data.strip().lower() in HUB_ALIASES or os.path.isdir(data):
        return resolve_source(data, "validation", strict)
    train = _resolve_files(data, strict)
    derived = [_train_to_validation_name(path) for path in train.shards]
    if None in derived:
        raise DataArgumentError(
            f"cannot derive a validation split from --data {data} (only c4-train.* files have a c4-validation "
            f"counterpart); pass the validation files with --val-data"
        )
    pattern = sorted({os.path.join(os.path.dirname(p), "c4-validation.*") for p in derived})
    found = sorted({hit for p in pattern for hit in glob.glob(p) if hit.endswith(JSON_SUFFIXES)})
    if not found:
        raise DataArgumentError(
            f"--data {data} names C4 training shards but no c4-validation.* shard lies next to them "
            f"(looked for {', '.join(pattern)}); pass the validation files with --val-data"
        )
    return DataSource(f"{data} (validation)", "json", tuple(found), strict)


def _train_to_validation_name(path: str) -> str | None:
    base = os.path.basename(path)
    if not base.startswith("c4-train."):
        return None
    return os.path.join(os.path.dirname(path), "c4-validation." + base[len("c4-train."):])


def _resolve_directory(directory: str, split: Split, strict: bool) -> DataSource:
    index = os.path.join(directory, split, "index.json")
    if os.path.isfile(index):
        meta = read_index(os.path.dirname(index))
        shards = tuple(os.path.join(directory, split, shard.get("tokens", "")) for shard in meta["shards"])
        missing = [path for path in shards if not os.path.isfile(path)]
        if missing:
            raise DataArgumentError(f"{index} lists {len(missing)} shard file(s) that do not exist (first: "
                                  f"{missing[0]}); copy the whole directory, or pre-tokenise again")
        return DataSource(f"{directory} ({split}, pre-tokenised)", "tokens", shards, strict)
    candidates = sorted(glob.glob(os.path.join(directory, f"c4-{split}.*")))
    shards = [path for path in candidates if path.endswith(JSON_SUFFIXES)]
    if not shards:
        present = sorted(os.listdir(directory))[:10]
        fix = ("pass the validation files with --val-data" if split == "validation" else
               f"name the files explicitly (--data '{directory}/*.json.gz'), rename them "
               f"c4-train.NNNNN-of-NNNNN.json.gz, or run make demo-data for a demo corpus")
        raise DataArgumentError(
            f"directory {directory} has no c4-{split}.* shards (*.json, *.json.gz, *.jsonl) and no "
            f"{split}/index.json (found: {', '.join(present) or 'nothing'}); {fix}"
        )
    _check_not_empty(shards)
    return DataSource(f"{directory} ({split})", "json", tuple(shards), strict)


def _resolve_files(data: str, strict: bool) -> DataSource:
    paths: list[str] = []
    for part in (p.strip() for p in data.split(",") if p.strip()):
        if glob.has_magic(part):
            hits = sorted(glob.glob(part, recursive=True))
            if not hits:
                raise DataArgumentError(f"--data pattern {part} matches no file; check the path and the quoting")
            paths.extend(hits)
        elif os.path.exists(part):
            paths.append(part)
        else:
            raise DataArgumentError(
                f"--data {part}: no such file or directory (and not 'c4'); give an existing path or a glob"
            )
    kinds = {_file_kind(path) for path in paths}
    if len(kinds) > 1:
        raise DataArgumentError(f"--data {data} mixes JSON and text files; use one kind per source")
    _check_not_empty(paths)
    return DataSource(data, kinds.pop(), tuple(paths), strict)


def _file_kind(path: str) -> Literal["json", "text"]:
    if os.path.isdir(path):
        raise DataArgumentError(f"{path} is a directory inside a file list; pass it alone as --data {path}")
    if path.endswith(JSON_SUFFIXES):
        return "json"
    if path.endswith(TEXT_SUFFIXES):
        return "text"
    raise DataArgumentError(
        f"{path}: unsupported file type; use *.json, *.json.gz, *.jsonl (one JSON object with a 'text' field "
        f"per line, C4 format) or *.txt"
    )


def _check_not_empty(paths: list[str]) -> None:
    """Fail at start-up, not when training reaches the file: empty files, and compressed files that hold nothing
    or are not gzip at all (a truncated end can only be found by reading the whole file: see readers)."""
    for path in paths:
        if os.path.getsize(path) == 0:
            raise DataArgumentError(f"{path} is empty (0 bytes); remove it from --data or regenerate it")
        if path.endswith(".gz"):
            try:
                with gzip.open(path, "rb") as handle:
                    empty = not handle.read(1)
            except (OSError, EOFError, zlib.error) as error:
                raise DataArgumentError(f"{path} is not a readable gzip file ({error}); download or generate it "
                                      f"again, or remove it from --data") from error
            if empty:
                raise DataArgumentError(f"{path} holds no data once decompressed; remove it from --data or "
                                      f"regenerate it")
