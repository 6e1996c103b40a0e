"""Validation batches for the analysis.

Stand-in for issue 5's ``ds_orthoadam.data`` (``load_tokenizer``, ``validation_batches``) with the same signatures,
batch format (``{"input_ids", "attention_mask"?}`` dicts) and sequence policy (every sequence starts with BOS, EOS after
each document, ``pack`` cuts the stream into ``seq_len`` pieces), so that the CLI switches to it by changing imports.
Sources: a ``.txt`` file (blank-line separated documents), a C4-format ``.json``/``.jsonl``/``.json.gz`` file, or a
directory holding ``c4-validation.*`` shards.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator, Mapping

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ds_orthoadam.analysis.errors import AnalysisInputError

Batch = Mapping[str, torch.Tensor]
_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


def batch_tensors(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input_ids, attention_mask or None)`` of a batch dict, on ``device``."""
    mask = batch.get("attention_mask")
    return batch["input_ids"].to(device), None if mask is None else mask.to(device)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """A tokenizer from a local Hugging Face tokenizer directory (nothing is fetched from the hub)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise AnalysisInputError(
            f"cannot load a tokenizer from {path}: {error}; pass --tokenizer DIR with the model's tokenizer"
        ) from error
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise AnalysisInputError(f"tokenizer {path} has no BOS or EOS token; set both in tokenizer_config.json")
    return tokenizer


def _shard_paths(source: str) -> list[str]:
    if os.path.isdir(source):
        paths = sorted(glob.glob(os.path.join(source, "c4-validation.*")))
        if not paths:
            raise AnalysisInputError(f"directory {source} holds no c4-validation.* shards; pass the shard files")
        return paths
    if not os.path.isfile(source):
        raise AnalysisInputError(f"data source {source} does not exist; pass a .txt, C4 .json(.gz) file or directory")
    return [source]


def _documents(path: str) -> Iterator[str]:
    if path.endswith(_JSON_SUFFIXES):
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    yield json.loads(line)["text"]
    elif path.endswith(".txt"):
        with open(path, encoding="utf-8") as text:
            yield from (paragraph for paragraph in text.read().split("\n\n") if paragraph.strip())
    else:
        raise AnalysisInputError(f"{path}: unknown data format; use .txt or C4-format .json/.jsonl/.json.gz")


def validation_batches(
    source: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, batch_size: int, num_docs: int, mode: str = "pack"
) -> list[dict[str, torch.Tensor]]:
    """Batches of the first ``num_docs`` documents: ``pack`` = BOS + ``seq_len - 1`` stream tokens per sequence
    (incomplete tail dropped); ``pad`` = one document per sequence, right-padded with an ``attention_mask``."""
    body = seq_len - 1
    sequences: list[list[int]] = []
    pending: list[int] = []
    documents = (doc for path in _shard_paths(source) for doc in _documents(path))
    for count, text in enumerate(documents):
        if count == num_docs:
            break
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if mode == "pad":
            sequences += [[tokenizer.bos_token_id] + tokens[i : i + body] for i in range(0, len(tokens), body)]
            continue
        pending += tokens
        while len(pending) >= body:
            sequences.append([tokenizer.bos_token_id] + pending[:body])
            pending = pending[body:]
    if not sequences:
        raise AnalysisInputError(f"{source} holds less than one sequence of seq_len={seq_len} tokens in {num_docs} "
                                 "documents; use more documents (--samples) or a shorter --seq-len")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        input_ids = torch.full((len(chunk), seq_len), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, sequence in enumerate(chunk):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        batches.append({"input_ids": input_ids} | ({"attention_mask": mask} if mode == "pad" else {}))
    return batches
