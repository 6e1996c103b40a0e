"""Pre-tokenise a source into memory-mapped token shards, one per source shard, with an index.

The format is :mod:`ds_orthoadam.data.token_shards`; the index is written last, so an interrupted run leaves no
index. ``--data OUT`` then trains from the shards with the same stream, order and resume positions, without
tokenising.

CLI: ``python -m ds_orthoadam.data.pretokenize --data data/demo --tokenizer data/demo/tokenizer --out data/demo-tok``
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from itertools import islice
from typing import Iterable, Iterator

import numpy as np

from ds_orthoadam.cli import ensure_output_dir, run_main
from .errors import DataError, DataSourceError, TokenizerError
from .sources import DataSource, resolve_source, validation_source
from .token_shards import DTYPES, INDEX_FILE, INDEX_FORMAT
from .tokenizer import encode_documents, load_tokenizer

ENCODE_BATCH = 256


def choose_dtype(vocab_size: int, requested: str = "auto") -> str:
    """uint16 when every id fits (vocab <= 65536), else uint32; an explicit uint16 that cannot hold them fails."""
    fits16 = vocab_size <= np.iinfo(np.uint16).max + 1
    if requested == "auto":
        return "uint16" if fits16 else "uint32"
    if requested not in DTYPES:
        raise TokenizerError(f"--dtype must be auto, uint16 or uint32, not {requested}")
    if requested == "uint16" and not fits16:
        raise TokenizerError(f"the tokenizer's ids go up to {vocab_size - 1}, beyond uint16 (max 65535); use "
                             f"--dtype uint32 or auto")
    return requested


def write_token_shard(out_dir: str, name: str, documents: Iterable[np.ndarray], dtype: str) -> dict:
    """Write ``documents`` (1-D arrays of token ids, no BOS/EOS) as shard ``name`` of ``out_dir``; returns its index
    entry. Ids that do not fit ``dtype`` are refused rather than wrapped around."""
    limit = np.iinfo(DTYPES[dtype]).max
    offsets = [0]
    with open(os.path.join(out_dir, name + ".bin"), "wb") as handle:
        for ids in documents:
            array = np.asarray(ids, dtype=np.int64)
            if array.size and (array.max() > limit or array.min() < 0):
                raise TokenizerError(f"token id {array.max() if array.max() > limit else array.min()} does not fit "
                                     f"{dtype}; use --dtype uint32")
            handle.write(array.astype(DTYPES[dtype]).tobytes())
            offsets.append(offsets[-1] + len(array))
    np.save(os.path.join(out_dir, name + ".offsets.npy"), np.asarray(offsets, dtype=np.int64))
    return {"tokens": name + ".bin", "offsets": name + ".offsets.npy", "documents": len(offsets) - 1,
            "num_tokens": offsets[-1]}


def write_index(out_dir: str, shards: list[dict], *, dtype: str, tokenizer_path: str, vocab_size: int, bos_id: int,
                eos_id: int, source: str) -> dict:
    """Write the split's index last and atomically: an index only ever describes a complete set of shards."""
    index = {"format": INDEX_FORMAT, "dtype": dtype, "tokenizer": os.path.abspath(tokenizer_path),
             "vocab_size": vocab_size, "bos_id": bos_id, "eos_id": eos_id, "source": source, "shards": shards}
    index_path = os.path.join(out_dir, INDEX_FILE)
    with open(index_path + ".tmp", "w") as handle:
        json.dump(index, handle, indent=1)
    os.replace(index_path + ".tmp", index_path)
    return index


def remove_index(out_dir: str) -> None:
    """Drop a split's index before its shards are rewritten, so an interrupted rewrite leaves no index."""
    index_path = os.path.join(out_dir, INDEX_FILE)
    if os.path.exists(index_path):
        os.remove(index_path)


def _encoded(source: DataSource, shard: int, tokenizer, max_docs: int | None) -> Iterator[list[int]]:
    documents = islice(source.open_shard(shard), max_docs)
    while texts := list(islice(documents, ENCODE_BATCH)):
        yield from encode_documents(tokenizer, texts)


def _write_shard(task: tuple[DataSource, int, str, str, str, int | None]) -> dict:
    source, shard, tokenizer_path, out_dir, dtype, max_docs = task
    tokenizer = load_tokenizer(tokenizer_path)
    entry = write_token_shard(out_dir, f"shard-{shard:05d}", _encoded(source, shard, tokenizer, max_docs), dtype)
    return entry | {"source": source.shards[shard]}


def _check_counts(workers: int, max_shards: int | None) -> None:
    """--workers and --max-shards must be positive: 0 used to mean "all shards" and -1 wrote an empty index."""
    if workers < 1:
        raise DataError(f"--workers must be at least 1, not {workers}")
    if max_shards is not None and max_shards < 1:
        raise DataError(f"--max-shards must be at least 1 (leave it out for all shards), not {max_shards}")


def pretokenize(source: DataSource, tokenizer_path: str, out_dir: str, dtype: str = "auto", workers: int = 1,
                max_shards: int | None = None, max_docs_per_shard: int | None = None) -> dict:
    """Tokenise the shards of ``source`` into ``out_dir`` (``workers`` processes); returns the written index."""
    if source.kind == "tokens":
        raise DataSourceError(f"{source.name} is already pre-tokenised")
    _check_counts(workers, max_shards)
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = choose_dtype(len(tokenizer), dtype)
    ensure_output_dir(out_dir)
    remove_index(out_dir)
    tasks = [(source, shard, tokenizer_path, out_dir, dtype, max_docs_per_shard)
             for shard in range(source.num_shards if max_shards is None else min(source.num_shards, max_shards))]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            shards = pool.map(_write_shard, tasks, chunksize=1)
    else:
        shards = [_write_shard(task) for task in tasks]
    return write_index(out_dir, shards, dtype=dtype, tokenizer_path=tokenizer_path, vocab_size=len(tokenizer),
                       bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, source=source.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_orthoadam.data.pretokenize",
                                     description="Pre-tokenise a source into memory-mapped token shards.")
    parser.add_argument("--data", required=True, help="source: c4, a directory of C4 shards, files or globs")
    parser.add_argument("--val-data", default=None,
                        help="validation source (default: derived from --data as training does: its validation "
                        "split, or the c4-validation.* files next to c4-train.* files)")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer directory or tokenizer.model")
    parser.add_argument("--out", required=True, help="output directory; gets train/ and validation/")
    parser.add_argument("--splits", nargs="+", default=["train", "validation"], choices=["train", "validation"])
    parser.add_argument("--dtype", default="auto", help="auto (uint16 if the vocabulary fits), uint16 or uint32")
    parser.add_argument("--workers", type=int, default=1, help="processes, one shard each at a time")
    parser.add_argument("--max-shards", type=int, default=None, help="only the first N shards of each split")
    parser.add_argument("--strict-data", action="store_true", help="fail on malformed JSON lines instead of skipping")
    args = parser.parse_args(argv)
    return run_main(lambda: _pretokenize_splits(args))


def _pretokenize_splits(args: argparse.Namespace) -> None:
    _check_counts(args.workers, args.max_shards)  # before the validation split is looked for
    ensure_output_dir(args.out)
    for split in args.splits:
        source = (resolve_source(args.data, "train", strict=args.strict_data) if split == "train" else
                  validation_source(args.data, args.val_data, strict=args.strict_data))
        index = pretokenize(source, args.tokenizer, os.path.join(args.out, split), args.dtype, args.workers,
                            args.max_shards)
        total = sum(shard["num_tokens"] for shard in index["shards"])
        print(f"{split}: {len(index['shards'])} shards, {total} tokens ({index['dtype']}) -> "
              f"{os.path.join(args.out, split)}")


if __name__ == "__main__":
    sys.exit(main())
