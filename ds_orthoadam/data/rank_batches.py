"""One rank's micro-batches of a run whose data order was laid out for another number of ranks.

A run's training order is fixed when it starts: ``S`` data streams (:class:`~.stream.TrainStream`, stream ``v``
being reader ``v`` of ``S``; ``S`` = the first world size, recorded in ``run.json`` as ``data_policy.world_size``),
and every optimiser step takes the next ``A0`` micro-batches of every stream: ``S * A0`` micro-batches in all. A
run resumed on ``N`` ranks with gradient accumulation ``A`` (``N * A == S * A0``: the same global batch) keeps that
order exactly: the step's micro-batches, listed stream by stream, are dealt out in consecutive runs of ``A`` to
rank 0, 1, ... So every optimiser step trains on the same sequences whatever the number of ranks -- nothing is
repeated or skipped -- and only the reduction order of the (mean) loss and gradient changes.

Cost: where ``N`` divides ``S`` (fewer ranks) a rank reads ``S / N`` whole streams. Where a stream is shared by
several ranks (more ranks than streams), each of them reads that stream whole and keeps its own micro-batches: up to
``N / S`` times the reading and tokenising per rank (pre-tokenised shards make that cheap; starting a new run on the
new number of ranks removes it).

State: each stream's own :meth:`~.stream.TrainStream.state_dict`, by stream number; streams shared by several ranks
are at the same position on each of them at every step boundary (all of a step's micro-batches are read before the
first one is handed out).
"""
from __future__ import annotations

from typing import Callable, Iterator

from .errors import DataArgumentError
from .stream import TrainStream


class RankBatches:
    """Endless micro-batches of rank ``rank`` of ``world_size``, ``micro_per_rank`` per optimiser step, taken from
    the ``num_streams`` streams of the run's order (``make_stream(v)`` builds stream ``v``)."""

    def __init__(self, make_stream: Callable[[int], TrainStream], num_streams: int, rank: int, world_size: int,
                 micro_per_rank: int) -> None:
        total = world_size * micro_per_rank
        if total % num_streams:
            raise DataArgumentError(
                f"this run's global batch is {total} micro-batches per step ({world_size} ranks x {micro_per_rank}), "
                f"which the run's {num_streams} data streams (its first number of ranks) cannot share equally: "
                f"choose train_batch_size / train_micro_batch_size_per_gpu as a multiple of {num_streams}")
        self.num_streams, self.micro_per_rank = num_streams, micro_per_rank
        self.micro_per_stream = total // num_streams
        first, last = rank * micro_per_rank, (rank + 1) * micro_per_rank  # this rank's slots of the step's list
        self.slots = range(first, last)
        touched = range(first // self.micro_per_stream, (last - 1) // self.micro_per_stream + 1)
        self.streams: dict[int, TrainStream] = {v: make_stream(v) for v in touched}

    @property
    def policy(self) -> dict:
        """The data policy of the run's order (:attr:`TrainStream.policy`; ``world_size`` is the number of streams)."""
        return next(iter(self.streams.values())).policy

    def __iter__(self) -> Iterator[dict]:
        iterators = {v: iter(stream) for v, stream in self.streams.items()}
        while True:
            step = []  # the whole step is read first, so that every stream stops at a step boundary
            for v, iterator in iterators.items():
                for micro in range(self.micro_per_stream):
                    batch = next(iterator)
                    if v * self.micro_per_stream + micro in self.slots:
                        step.append(batch)
            yield from step

    def state_dict(self) -> dict:
        """``{"streams": {stream number: its state}}`` of the streams this rank reads (plain Python)."""
        return {"streams": {str(v): stream.state_dict() for v, stream in self.streams.items()}}

    def load_state_dict(self, states: list[dict]) -> None:
        """Continue after the last step of ``states`` (the :meth:`state_dict` of every rank that saved them, in any
        number; a state of a single :class:`TrainStream`, as runs saved before this class, counts as its stream)."""
        by_stream = {}
        for state in states:
            streams = state["streams"] if "streams" in state else {str(state["rank"]): state}
            by_stream.update({int(v): stream for v, stream in streams.items()})
        missing = sorted(set(self.streams) - set(by_stream))
        if missing:
            raise DataArgumentError(f"the checkpoint holds no position for data stream(s) {missing}: it was not "
                                    f"written by a run with {self.num_streams} data streams")
        for v, stream in self.streams.items():
            stream.load_state_dict(by_stream[v])
