"""RankBatches: the run's data order, laid out for its first number of ranks, on any number of ranks.

Reference: the run's ``S`` streams read as the run that kept ``S`` ranks reads them (stream ``v`` = rank ``v``'s own
:class:`TrainStream`), each optimiser step taking the next ``A0`` micro-batches of every stream. On ``N`` ranks,
every step's micro-batches, rank after rank, must be exactly those, in that order -- also after a save on one number
of ranks and a load on another.
"""
from itertools import islice

import pytest
import torch

from ds_orthoadam.data.errors import DataArgumentError
from ds_orthoadam.data.rank_batches import RankBatches
from ds_orthoadam.data.stream import TrainStream

SEQ_LEN, MICRO = 32, 2
pytestmark = pytest.mark.filterwarnings("ignore:.*shards over 2 readers")  # the corpus has 3 shards


def stream_factory(source, tokenizer, num_streams):
    return lambda v: TrainStream(source, tokenizer, SEQ_LEN, MICRO, v, num_streams, shuffle_block=16)


def reference_steps(source, tokenizer, num_streams: int, per_stream: int, steps: int) -> list[list[dict]]:
    """Each step's micro-batches in the run's order: ``per_stream`` of stream 0, then of stream 1, ..."""
    streams = [iter(stream_factory(source, tokenizer, num_streams)(v)) for v in range(num_streams)]
    return [[batch for stream in streams for batch in islice(stream, per_stream)] for _ in range(steps)]


def ranks_of(source, tokenizer, num_streams: int, world_size: int, per_stream: int) -> list[RankBatches]:
    per_rank = num_streams * per_stream // world_size
    return [RankBatches(stream_factory(source, tokenizer, num_streams), num_streams, rank, world_size, per_rank)
            for rank in range(world_size)]


def take_steps(ranks: list[RankBatches], steps: int) -> list[list[dict]]:
    """Each step's micro-batches of every rank, rank after rank (iterating each rank's batches once)."""
    iterators = [iter(rank) for rank in ranks]
    return [[batch for rank, iterator in zip(ranks, iterators) for batch in islice(iterator, rank.micro_per_rank)]
            for _ in range(steps)]


def assert_same_steps(got: list[list[dict]], want: list[list[dict]]) -> None:
    assert len(got) == len(want)
    for step, (have, expected) in enumerate(zip(got, want)):
        assert len(have) == len(expected), step
        for one, other in zip(have, expected):
            assert one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one), step


@pytest.mark.parametrize("num_streams, per_stream, world_size", [(2, 2, 1), (1, 2, 2), (2, 3, 3), (2, 2, 4)])
def test_every_step_holds_the_run_orders_micro_batches_on_any_number_of_ranks(corpus, tokenizer, num_streams,
                                                                              per_stream, world_size):
    want = reference_steps(corpus["dir"], tokenizer, num_streams, per_stream, steps=4)
    assert_same_steps(take_steps(ranks_of(corpus["dir"], tokenizer, num_streams, world_size, per_stream), 4), want)


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (1, 2), (2, 3)])
def test_a_position_saved_on_some_ranks_continues_on_others(corpus, tokenizer, saved_on, resumed_on):
    """2 streams, 3 micro-batches each per step: saved after 3 steps, resumed for 3 more."""
    num_streams, per_stream = 2, 3
    want = reference_steps(corpus["dir"], tokenizer, num_streams, per_stream, steps=6)
    before = ranks_of(corpus["dir"], tokenizer, num_streams, saved_on, per_stream)
    assert_same_steps(take_steps(before, 3), want[:3])
    after = ranks_of(corpus["dir"], tokenizer, num_streams, resumed_on, per_stream)
    for rank in after:
        rank.load_state_dict([saving.state_dict() for saving in before])
    assert_same_steps(take_steps(after, 3), want[3:])


def test_a_single_stream_state_of_an_older_checkpoint_counts_as_its_stream(corpus, tokenizer):
    """Checkpoints written before RankBatches hold each rank's TrainStream state (its ``rank`` = its stream)."""
    make = stream_factory(corpus["dir"], tokenizer, 2)
    old = [make(v) for v in range(2)]
    for stream in old:
        list(islice(iter(stream), 2))
    resumed = RankBatches(make, 2, 0, 1, micro_per_rank=4)
    resumed.load_state_dict([stream.state_dict() for stream in old])
    want = [batch for stream in old for batch in islice(iter(stream), 2)]
    assert_same_steps([list(islice(iter(resumed), 4))], [want])


def test_a_global_batch_the_streams_cannot_share_is_refused(corpus, tokenizer):
    with pytest.raises(DataArgumentError, match="cannot share equally"):
        RankBatches(stream_factory(corpus["dir"], tokenizer, 2), 2, 0, 3, micro_per_rank=1)


def test_a_checkpoint_without_a_stream_this_rank_reads_is_refused(corpus, tokenizer):
    make = stream_factory(corpus["dir"], tokenizer, 2)
    resumed = RankBatches(make, 2, 0, 1, micro_per_rank=2)
    with pytest.raises(DataArgumentError, match=r"no position for data stream\(s\) \[1\]"):
        resumed.load_state_dict([RankBatches(make, 2, 0, 2, micro_per_rank=1).state_dict()])
