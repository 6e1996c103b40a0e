"""Validation batches: the first N documents of the validation split, tokenised and cut the same way every time.

No shuffling: documents are read in shard order and cut with the training policy (BOS + ``seq_len - 1`` tokens,
EOS after each document; the incomplete last sequence of ``pack`` mode is dropped). With several ranks, rank r
evaluates sequences r, r + W, ... so that the ranks' summed losses cover the set once. Token ids are kept in
memory as int32 (the paper's 100000 C4 documents are about 50M tokens, 200 MB).
"""
from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from .errors import DataSourceError
from .packing import IGNORE_INDEX, Mode, collate, cut_sequences
from .sources import DataSource, resolve_source
from .stream import tokenized

PAPER_VALIDATION_DOCS = 100_000


class ValidationSet:
    """Re-iterable list of validation batches (same keys as the training stream); built on first use."""

    def __init__(self, source: str | DataSource, tokenizer: PreTrainedTokenizerFast, seq_len: int, batch_size: int,
                 num_docs: int = PAPER_VALIDATION_DOCS, rank: int = 0, world_size: int = 1, mode: Mode = "pack"):
        self.source = resolve_source(source, "validation") if isinstance(source, str) else source
        self.tokenizer, self.seq_len, self.batch_size, self.num_docs = tokenizer, seq_len, batch_size, num_docs
        self.rank, self.world_size, self.mode = rank, world_size, mode
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._sequences: list[np.ndarray] | None = None
        self.documents_read = 0

    def _build(self) -> list[np.ndarray]:
        if self._sequences is None:
            documents = enumerate(self.source.documents(self.num_docs))
            sequences = [np.asarray(sequence, dtype=np.int32) for sequence, _ in cut_sequences(
                self._counted(tokenized(documents, self.tokenizer)), self.seq_len, self.tokenizer.bos_token_id,
                self.tokenizer.eos_token_id, self.mode)]
            if not sequences:
                raise DataSourceError(f"validation source {self.source.name} holds less than one sequence of "
                                      f"seq_len={self.seq_len} tokens; use more validation data or a shorter --seq-len")
            if self.documents_read < self.num_docs:
                warnings.warn(f"validation source {self.source.name} has only {self.documents_read} documents "
                              f"(asked for {self.num_docs}); evaluating on all of them", stacklevel=3)
            self._sequences = sequences[self.rank::self.world_size]
        return self._sequences

    def _counted(self, documents: Iterator) -> Iterator:
        for item in documents:
            self.documents_read += 1
            yield item

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        sequences = self._build()
        for start in range(0, len(sequences), self.batch_size):
            yield collate(sequences[start: start + self.batch_size], self.seq_len, self.pad_id, self.mode)

    def __len__(self) -> int:
        return -(-len(self._build()) // self.batch_size)

    @property
    def num_sequences(self) -> int:
        return len(self._build())

    @property
    def num_predicted_tokens(self) -> int:
        """Tokens scored by the causal-LM loss on this rank (every real token after the first of a sequence)."""
        return sum(len(sequence) - 1 for sequence in self._build())


def validation_batches(source: str | DataSource, tokenizer: PreTrainedTokenizerFast, seq_len: int, batch_size: int,
                       num_docs: int = PAPER_VALIDATION_DOCS, rank: int = 0, world_size: int = 1,
                       mode: Mode = "pack") -> ValidationSet:
    """Batches ``{"input_ids", "labels"[, "attention_mask"]}`` of the first ``num_docs`` validation documents.

    ``source``: a :class:`DataSource` (e.g. from :func:`validation_source`) or a string resolved with the
    validation split. Labels of padding are -100 (``IGNORE_INDEX``).
    """
    return ValidationSet(source, tokenizer, seq_len, batch_size, num_docs, rank, world_size, mode)


__all__ = ["ValidationSet", "validation_batches", "PAPER_VALIDATION_DOCS", "IGNORE_INDEX"]
