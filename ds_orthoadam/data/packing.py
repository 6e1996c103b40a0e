"""Cut tokenised documents into training sequences, and stack sequences into batches.

Policy (recorded with every run, see :func:`sequence_policy`): every sequence starts with BOS, so position 0 means
the same thing in every sequence; documents are followed by EOS.

* ``pack`` (default): the stream ``doc0 EOS doc1 EOS ...`` is cut into pieces of ``seq_len - 1`` tokens, each
  prefixed with BOS. No padding; a document may continue in the next sequence.
* ``pad``: every sequence holds tokens of one document only (``BOS doc EOS``, long documents continue in further
  sequences); the rest is padding, masked out of attention and loss.

Each sequence comes with the resume position of the next unconsumed token: ``(cursor, offset)`` = document
``cursor`` with ``offset`` of its tokens (EOS included) already used. Restarting the document iterator at ``cursor``
with ``skip_tokens=offset`` continues exactly there.
"""
from __future__ import annotations

from typing import Hashable, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch

Mode = Literal["pack", "pad"]
MODES = ("pack", "pad")
IGNORE_INDEX = -100  # label value that transformers' causal-LM loss ignores


def sequence_policy(mode: Mode, seq_len: int, bos_id: int, eos_id: int, pad_id: int) -> dict:
    """What a sequence is made of: store this with the run so that analyses know what the first token is."""
    return {"mode": mode, "seq_len": seq_len, "bos_starts_every_sequence": True, "eos_after_every_document": True,
            "bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id if mode == "pad" else None}


def cut_sequences(
    documents: Iterable[tuple[Hashable, Sequence[int]]],
    seq_len: int,
    bos_id: int,
    eos_id: int,
    mode: Mode = "pack",
    skip_tokens: int = 0,
) -> Iterator[tuple[list[int], tuple[Hashable, int]]]:
    """Yield ``(sequence, (cursor, offset))``; ``skip_tokens`` drops that many tokens of the first document."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (BOS + one token), got {seq_len}")
    body = seq_len - 1
    pending: list[int] = []
    for cursor, ids in documents:
        if len(ids) == 0:
            skip_tokens = 0
            continue
        tokens = (ids.tolist() if isinstance(ids, np.ndarray) else list(ids)) + [eos_id]
        offset, skip_tokens = skip_tokens, 0
        while offset < len(tokens):
            taken = tokens[offset: offset + body - len(pending)]
            pending.extend(taken)
            offset += len(taken)
            if len(pending) == body or (mode == "pad" and offset == len(tokens)):
                yield [bos_id] + pending, (cursor, offset)
                pending = []


def collate(sequences: Sequence[Sequence[int]], seq_len: int, pad_id: int, mode: Mode) -> dict[str, torch.Tensor]:
    """Stack sequences into ``input_ids``/``labels`` [B, T] (plus ``attention_mask`` in pad mode).

    Labels equal the inputs (transformers' causal-LM loss shifts them); padded positions get label -100.
    """
    rows = [(s.tolist() if isinstance(s, np.ndarray) else list(s)) for s in sequences]
    lengths = torch.tensor([len(row) for row in rows])
    input_ids = torch.tensor([row + [pad_id] * (seq_len - len(row)) for row in rows], dtype=torch.long)
    real = torch.arange(seq_len)[None, :] < lengths[:, None]
    batch = {"input_ids": input_ids, "labels": input_ids.masked_fill(~real, IGNORE_INDEX)}
    if mode == "pad":
        batch["attention_mask"] = real.long()
    return batch
