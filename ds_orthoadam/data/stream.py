"""The training stream: deterministic, shuffled, rank- and worker-sharded packed batches with exact, cheap resume.

Order of documents. Each epoch permutes the shards (seed, epoch). Every reader (one per data-parallel rank and
DataLoader worker: ``reader = rank * num_workers + worker``) then owns either whole shards (``shards[reader::R]``,
when there are at least R = world_size * num_workers shards, as with C4's 1024) or, with fewer shards, every R-th
document of each shard. Inside a shard, documents are shuffled within blocks of ``shuffle_block`` documents
(permutation seeded by seed, epoch, shard, block). Readers never overlap.

Whole shards go out in equal numbers: the last ``num_shards % R`` shards of an epoch's permutation are left out of
that epoch (a different few each epoch), like ``DistributedSampler(drop_last=True)``. Ranks consume batches in
lockstep, so a reader with one shard more would still be in epoch e while the others had wrapped into epoch e + 1
and were serving documents a second time. With fewer shards than readers every document is read once per epoch.

Resume. A reader's position is ``cursor = [epoch, unit, block, doc]`` (its unit = shard in this epoch, the block
in that shard, the document in its share of the block) plus the tokens of that document already used. Restoring
opens that shard at the block's first document (datasets skips earlier lines without tokenising them; a
pre-tokenised shard seeks directly), so the cost does not grow with the number of steps taken.
"""
from __future__ import annotations

import os
import warnings
from itertools import count, islice
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerFast

from .errors import DataSourceError, TokenizerError
from .packing import MODES, Mode, collate, cut_sequences, sequence_policy
from .sources import DataSource, resolve_source
from .tokenizer import encode_documents

STATE_FORMAT = 1
TOKENIZE_BATCH = 64
START = {"cursor": [0, 0, 0, 0], "token": 0}


def epoch_units(num_shards: int, reader: int, num_readers: int, seed: int, epoch: int) -> list[tuple[int, int, int]]:
    """This reader's work in ``epoch``: ``(shard, first document, document step)`` per unit, in reading order."""
    order = np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()
    if num_shards >= num_readers:
        return [(shard, 0, 1) for shard in order[:num_shards - num_shards % num_readers][reader::num_readers]]
    return [(shard, reader, num_readers) for shard in order]


def block_order(block_length: int, seed: int, epoch: int, shard: int, block: int) -> list[int]:
    """Shuffled order of the documents of one block: the same for every reader, so their shares stay disjoint."""
    return np.random.default_rng([seed, epoch, shard, block]).permutation(block_length).tolist()


def reader_documents(source: DataSource, reader: int, num_readers: int, seed: int, shuffle_block: int,
                     cursor: list[int]) -> Iterator[tuple[tuple[int, int, int, int], Any]]:
    """Endless ``(cursor, document)`` of one reader, starting at ``cursor``."""
    epoch, first_unit, first_block, first_doc = cursor
    while True:
        units, served = epoch_units(source.num_shards, reader, num_readers, seed, epoch), 0
        for unit in range(first_unit, len(units)):
            shard, offset, step = units[unit]
            documents = source.open_shard(shard, start_doc=first_block * shuffle_block)
            for block in count(first_block):
                docs = list(islice(documents, shuffle_block))
                if not docs:
                    break
                share = block_order(len(docs), seed, epoch, shard, block)[offset::step]
                for doc in range(first_doc, len(share)):
                    served += 1
                    yield (epoch, unit, block, doc), docs[share[doc]]
                first_doc = 0
            first_block = 0
        if served == 0 and first_unit == 0:
            raise DataSourceError(
                f"reader {reader} of {num_readers} (one per rank and loader worker) gets no document of "
                f"{source.name}: it has fewer documents than readers; use more data or fewer ranks / workers"
            )
        first_unit = 0
        epoch += 1


def tokenized(documents: Iterator[tuple[Any, Any]], tokenizer: PreTrainedTokenizerFast) -> Iterator[tuple[Any, Any]]:
    """Tokenise text documents in small batches (pre-tokenised arrays pass through)."""
    while batch := list(islice(documents, TOKENIZE_BATCH)):
        cursors, docs = zip(*batch)
        if isinstance(docs[0], str):
            docs = encode_documents(tokenizer, docs)
        yield from zip(cursors, docs)


def checked_epochs(documents: Iterator[tuple[Any, Any]], seq_len: int, describe: str,
                   started_mid_epoch: bool) -> Iterator[tuple[Any, Any]]:
    """Fail clearly when one reader's share of an epoch is smaller than one sequence (or empty)."""
    epoch, tokens, check = None, 0, not started_mid_epoch
    for cursor, ids in documents:
        if cursor[0] != epoch:
            if epoch is not None and check and tokens < seq_len:
                raise DataSourceError(
                    f"{describe} holds only {tokens} tokens per epoch, less than one sequence (seq_len={seq_len}); "
                    f"use more data, a shorter --seq-len, or fewer ranks / loader workers"
                )
            epoch, tokens, check = cursor[0], 0, epoch is not None or not started_mid_epoch
        tokens += len(ids) + 1 if len(ids) else 0  # cut_sequences drops empty documents, EOS included
        yield cursor, ids


class _StreamConfig:
    """Everything a reader needs; plain attributes so DataLoader workers can use it after fork."""

    def __init__(self, source: DataSource, tokenizer: PreTrainedTokenizerFast, seq_len: int,
                 micro_batch_size: int, rank: int, world_size: int, num_workers: int, seed: int, mode: Mode,
                 shuffle_block: int):
        self.source, self.tokenizer, self.seq_len, self.micro_batch_size = source, tokenizer, seq_len, micro_batch_size
        self.rank, self.world_size, self.num_workers, self.seed = rank, world_size, num_workers, seed
        self.mode, self.shuffle_block = mode, shuffle_block
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def num_readers(self) -> int:
        """Readers of the source: one per rank and DataLoader worker (one per rank without workers)."""
        return self.world_size * max(self.num_workers, 1)

    def batches(self, slot: int, position: dict) -> Iterator[tuple[dict, dict]]:
        """Endless ``(batch, position after it)`` of worker slot ``slot`` of this rank."""
        readers = self.num_readers
        reader = self.rank * max(self.num_workers, 1) + slot
        describe = f"the share of {self.source.name} read by rank {self.rank} (reader {reader} of {readers})"
        docs = reader_documents(self.source, reader, readers, self.seed, self.shuffle_block, position["cursor"])
        docs = checked_epochs(tokenized(docs, self.tokenizer), self.seq_len, describe, position != START)
        sequences = cut_sequences(docs, self.seq_len, self.tokenizer.bos_token_id, self.tokenizer.eos_token_id,
                                  self.mode, skip_tokens=position["token"])
        while chunk := list(islice(sequences, self.micro_batch_size)):
            (cursor, offset) = chunk[-1][1]
            yield (collate([seq for seq, _ in chunk], self.seq_len, self.pad_id, self.mode),
                   {"cursor": list(cursor), "token": offset})


class _WorkerStreams(IterableDataset):
    """DataLoader view: worker ``w`` plays slot ``(w + first_slot) % W`` so a resumed loader keeps the order."""

    def __init__(self, config: _StreamConfig, positions: dict[int, dict], first_slot: int):
        self.config, self.positions, self.first_slot = config, positions, first_slot

    def __iter__(self):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; workers are the parallelism
        slot = (get_worker_info().id + self.first_slot) % self.config.num_workers
        for batch, position in self.config.batches(slot, self.positions.get(slot, START)):
            yield {**batch, "slot": slot, "position": position}


class TrainStream:
    """Endless training batches ``{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`` for one rank.

    ``source``: a ``--data`` string or a :class:`DataSource`. ``mode``: ``pack`` or ``pad`` (pad adds
    ``attention_mask``). ``num_workers``: DataLoader worker processes that read and tokenise in the background
    (0 = in this process). Iterating continues from the current position; :meth:`state_dict` /
    :meth:`load_state_dict` save and restore it exactly (store it in the checkpoint's client_state, per rank).
    """

    def __init__(self, source: str | DataSource, tokenizer: PreTrainedTokenizerFast, seq_len: int,
                 micro_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, mode: Mode = "pack",
                 num_workers: int = 0, shuffle_block: int = 4096, strict: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        source = resolve_source(source, "train", strict) if isinstance(source, str) else source
        _check_token_source(source, tokenizer)
        self.config = _StreamConfig(source, tokenizer, seq_len, micro_batch_size, rank, world_size, num_workers,
                                    seed, mode, shuffle_block)
        readers = self.config.num_readers
        if rank == 0 and source.num_shards > readers and source.num_shards % readers:
            warnings.warn(f"{source.name}: {source.num_shards} shards over {readers} readers (ranks x loader "
                          f"workers): every epoch leaves out {source.num_shards % readers} shards (a different few "
                          f"each epoch) so that each reader gets {source.num_shards // readers}; use a number of "
                          f"readers that divides {source.num_shards} to read them all", stacklevel=2)
        self.positions: dict[int, dict] = {}
        self.next_slot = 0
        self.batches_served = 0

    @property
    def policy(self) -> dict:
        """BOS/EOS/packing policy and sharding of this stream, to be recorded with the run."""
        c = self.config
        return {**sequence_policy(c.mode, c.seq_len, c.tokenizer.bos_token_id, c.tokenizer.eos_token_id, c.pad_id),
                "source": c.source.name, "seed": c.seed, "shuffle_block": c.shuffle_block,
                "world_size": c.world_size, "num_workers": c.num_workers}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        c = self.config
        if c.num_workers == 0:
            items = ({**batch, "slot": 0, "position": position}
                     for batch, position in c.batches(0, self.positions.get(0, START)))
        else:
            items = iter(DataLoader(_WorkerStreams(c, dict(self.positions), self.next_slot), batch_size=None,
                                    num_workers=c.num_workers, prefetch_factor=4))
        for item in items:
            slot, position = item.pop("slot"), item.pop("position")
            self.positions[int(slot)] = position
            self.next_slot = (int(slot) + 1) % max(c.num_workers, 1)
            self.batches_served += 1
            yield item

    def state_dict(self) -> dict:
        """Plain-Python position of this rank's stream (all ints): save it per rank in the checkpoint."""
        c = self.config
        return {"format": STATE_FORMAT, "rank": c.rank, "identity": self._identity(),
                "positions": {str(slot): position for slot, position in self.positions.items()},
                "next_slot": self.next_slot, "batches_served": self.batches_served}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the last batch served before ``state`` was taken."""
        if state.get("format") != STATE_FORMAT:
            raise DataSourceError(f"unknown data-stream state format {state.get('format')!r}; expected {STATE_FORMAT}")
        if state["rank"] != self.config.rank:
            raise DataSourceError(f"this data-stream state belongs to rank {state['rank']}, not rank "
                                  f"{self.config.rank}; save and load one state per rank")
        changed = {key: (value, self._identity()[key]) for key, value in state["identity"].items()
                   if self._identity()[key] != value}
        if changed:
            detail = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
            raise DataSourceError(
                f"cannot resume the data stream exactly: {detail}. Resume with the same data settings and number of "
                f"ranks/workers, or start the data stream afresh (do not load its state)"
            )
        self.positions = {int(slot): position for slot, position in state["positions"].items()}
        self.next_slot = state["next_slot"]
        self.batches_served = state["batches_served"]

    def gathered_state_dict(self) -> list[dict]:
        """Every rank's :meth:`state_dict`, gathered (a collective call when torch.distributed is initialised).

        DeepSpeed writes ``client_state`` from data-parallel rank 0 only, so store this list there, not the
        rank's own state.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return [self.state_dict()]
        states: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, self.state_dict())
        return states

    def load_gathered_state_dict(self, states: list[dict]) -> None:
        """Load this rank's entry of a :meth:`gathered_state_dict` list."""
        if len(states) != self.config.world_size:
            raise DataSourceError(f"the checkpoint holds data-stream states of {len(states)} ranks, this run has "
                                  f"{self.config.world_size}; resume with the same number of ranks")
        self.load_state_dict(states[self.config.rank])

    def _identity(self) -> dict:
        c = self.config
        return {"source": c.source.name, "shards": c.source.num_shards, "seq_len": c.seq_len,
                "micro_batch_size": c.micro_batch_size, "world_size": c.world_size, "num_workers": c.num_workers,
                "seed": c.seed, "mode": c.mode, "shuffle_block": c.shuffle_block,
                "vocab": len(c.tokenizer), "bos": c.tokenizer.bos_token_id, "eos": c.tokenizer.eos_token_id}


def _check_token_source(source: DataSource, tokenizer: PreTrainedTokenizerFast) -> None:
    index = source.token_index()
    if index and (index["vocab_size"], index["bos_id"], index["eos_id"]) != (
            len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id):
        raise TokenizerError(
            f"{source.name} was pre-tokenised with another tokenizer (vocab {index['vocab_size']}, bos "
            f"{index['bos_id']}, eos {index['eos_id']}) than the one given (vocab {len(tokenizer)}); use that "
            f"tokenizer ({index.get('tokenizer')}) or pre-tokenise again"
        )
