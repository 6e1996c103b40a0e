"""The training stream: coverage across ranks, exact resume (1 and 2 ranks, with loader workers), resume cost."""
from itertools import islice

import pytest
import torch

from data_fixtures import make_documents, write_json_shard
from ds_orthoadam.data.errors import DataSourceError
from ds_orthoadam.data.sources import DataSource, resolve_source
from ds_orthoadam.data.stream import TrainStream
from ds_orthoadam.data.tokenizer import encode_documents, load_tokenizer

SEQ_LEN, BATCH = 32, 4


def first_documents(stream, tokenizer, count):
    """Un-pack a rank's batches into its first ``count`` documents (split at EOS)."""
    documents, current = [], []
    for batch in stream:
        for token in (t for row in batch["input_ids"].tolist() for t in row[1:]):
            if token != tokenizer.eos_token_id:
                current.append(token)
                continue
            documents.append(tuple(current))
            current = []
            if len(documents) == count:
                return documents


def share_size(shard_sizes, rank, world_size, block):
    """Documents per epoch of one reader, counted independently of the stream's code."""
    if len(shard_sizes) >= world_size:  # whole shards, as many per reader (all the same size here)
        return shard_sizes[0] * (len(shard_sizes) // world_size)
    return sum(len(range(rank, min(block, size - start), world_size))
               for size in shard_sizes for start in range(0, size, block))


@pytest.mark.parametrize("world_size,shuffle_block", [(1, 4096), (3, 7), (4, 16)])
def test_ranks_cover_every_document_once_per_epoch(corpus, tokenizer, world_size, shuffle_block):
    # 3 shards: worlds 1 and 3 share whole shards, world 4 splits documents inside shards.
    expected = [tuple(ids) for ids in encode_documents(tokenizer, [d for shard in corpus["train"] for d in shard])]
    sizes = [len(shard) for shard in corpus["train"]]
    seen = []
    for rank in range(world_size):
        stream = TrainStream(corpus["dir"], tokenizer, SEQ_LEN, BATCH, rank, world_size, seed=3,
                             shuffle_block=shuffle_block)
        seen += first_documents(stream, tokenizer, share_size(sizes, rank, world_size, shuffle_block))
    assert sorted(seen) == sorted(expected)  # no document twice, none missing, each one whole and in order


def test_uneven_whole_shards_leave_some_out_rather_than_serve_documents_twice(corpus, tokenizer):
    # 3 shards, 2 ranks: one shard each per epoch. Had rank 0 read two, rank 1 (consuming in lockstep) would wrap
    # into its next epoch after one shard and serve documents a second time while the third shard was still unread.
    shards = [sorted(tuple(ids) for ids in encode_documents(tokenizer, shard)) for shard in corpus["train"]]
    per_shard = len(shards[0])
    with pytest.warns(UserWarning, match="3 shards over 2 readers.*leaves out 1 shards"):
        TrainStream(corpus["dir"], tokenizer, SEQ_LEN, BATCH, 0, 2, seed=3)
    streams = [TrainStream(corpus["dir"], tokenizer, SEQ_LEN, BATCH, rank, 2, seed=3) for rank in range(2)]
    read = [first_documents(stream, tokenizer, 2 * per_shard + 5) for stream in streams]
    for epoch in range(2):
        parts = [sorted(docs[epoch * per_shard:(epoch + 1) * per_shard]) for docs in read]
        assert all(part in shards for part in parts) and parts[0] != parts[1]  # whole shards, not the same one
    assert [stream.state_dict()["positions"]["0"]["cursor"][0] for stream in streams] == [2, 2]  # in step



def test_shuffling_depends_on_seed_and_is_reproducible(corpus, tokenizer):
    def first(seed):
        return next(iter(TrainStream(corpus["dir"], tokenizer, SEQ_LEN, BATCH, seed=seed)))["input_ids"]

    assert torch.equal(first(0), first(0))
    assert not torch.equal(first(0), first(1))


def resume_matches(source, tokenizer, world_size, consumed, upcoming, **options):
    """Compare a resumed stream with an uninterrupted one on every rank; returns the saved states."""
    states = []
    for rank in range(world_size):
        reference = TrainStream(source, tokenizer, SEQ_LEN, BATCH, rank, world_size, **options)
        expected = list(islice(iter(reference), consumed + upcoming))[consumed:]
        interrupted = TrainStream(source, tokenizer, SEQ_LEN, BATCH, rank, world_size, **options)
        list(islice(iter(interrupted), consumed))
        state = interrupted.state_dict()
        states.append(state)
        resumed = TrainStream(source, tokenizer, SEQ_LEN, BATCH, rank, world_size, **options)
        resumed.load_state_dict(state)
        got = list(islice(iter(resumed), upcoming))
        for want, have in zip(expected, got, strict=True):
            assert want.keys() == have.keys()
            assert all(torch.equal(want[key], have[key]) for key in want)
    return states


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("consumed", [1, 13, 90])
def test_resume_continues_with_the_next_batches(corpus, tokenizer, world_size, consumed):
    states = resume_matches(corpus["dir"], tokenizer, world_size, consumed, upcoming=5, shuffle_block=16)
    if consumed == 90:  # this case must test resuming in the second epoch
        assert all(state["positions"]["0"]["cursor"][0] >= 1 for state in states)


def test_resume_in_pad_mode(corpus, tokenizer):
    resume_matches(corpus["dir"], tokenizer, 1, consumed=9, upcoming=4, mode="pad")


def test_resume_with_loader_workers(corpus, tokenizer):
    resume_matches(corpus["dir"], tokenizer, 1, consumed=5, upcoming=4, num_workers=2)  # odd: rotates workers


class CountingSource(DataSource):
    """Records which shards are opened at which document."""

    opened: list

    def open_shard(self, index, start_doc=0):
        self.opened.append((index, start_doc))
        return super().open_shard(index, start_doc)


def test_resume_opens_only_the_current_shard(corpus, tokenizer):
    base = resolve_source(corpus["dir"])
    source = CountingSource(base.name, base.kind, base.shards)
    object.__setattr__(source, "opened", [])
    stream = TrainStream(source, tokenizer, SEQ_LEN, BATCH, shuffle_block=8)
    list(islice(iter(stream), 30))
    state = stream.state_dict()
    epoch, unit, block, _ = state["positions"]["0"]["cursor"]
    assert unit > 0 or epoch > 0, "the test needs a position past the first shard"
    source.opened.clear()
    resumed = TrainStream(source, tokenizer, SEQ_LEN, BATCH, shuffle_block=8)
    resumed.load_state_dict(state)
    next(iter(resumed))
    assert source.opened[0][1] == block * 8  # opened at its block: no earlier shard, no earlier block
    assert len({shard for shard, _ in source.opened}) == len(source.opened)


def test_resume_refuses_a_different_layout(corpus, tokenizer):
    stream = TrainStream(corpus["dir"], tokenizer, SEQ_LEN, BATCH, rank=0, world_size=2)
    next(iter(stream))
    with pytest.raises(DataSourceError, match="world_size 2 -> 4"):
        TrainStream(corpus["dir"], tokenizer, SEQ_LEN, BATCH, rank=0, world_size=4).load_state_dict(
            stream.state_dict())
    with pytest.raises(DataSourceError, match="belongs to rank 0"):
        TrainStream(corpus["dir"], tokenizer, SEQ_LEN, BATCH, rank=1, world_size=2).load_state_dict(
            stream.state_dict())


def test_pad_mode_batches_mask_padding(corpus, tokenizer):
    batch = next(iter(TrainStream(corpus["dir"], tokenizer, 256, BATCH, mode="pad")))
    padded = batch["attention_mask"] == 0
    assert padded.any() and (batch["labels"][padded] == -100).all() and (batch["input_ids"][:, 0] == 1).all()


def test_too_little_data_for_the_readers_fails_clearly(tmp_path, tokenizer):
    one_doc = write_json_shard(str(tmp_path / "one.jsonl"), make_documents(1, min_words=50, max_words=50))
    with pytest.raises(DataSourceError, match="gets no document"):
        next(iter(TrainStream(one_doc, tokenizer, SEQ_LEN, BATCH, rank=1, world_size=2)))
    with pytest.raises(DataSourceError, match="less than one sequence"):
        next(iter(TrainStream(one_doc, tokenizer, 4096, BATCH)))
    # Many empty documents (no tokens, not even an EOS: packing drops them) are no data either; this used to hang.
    empty = write_json_shard(str(tmp_path / "empty-texts.jsonl"), [""] * 200)
    with pytest.raises(DataSourceError, match="holds only 0 tokens per epoch"):
        next(iter(TrainStream(empty, tokenizer, SEQ_LEN, BATCH)))


def _two_rank_worker(rank, directory, tokenizer_dir, consumed, init_file, out_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    stream = TrainStream(directory, load_tokenizer(tokenizer_dir), SEQ_LEN, BATCH, rank, 2, shuffle_block=16)
    list(islice(iter(stream), consumed + rank))  # ranks may differ; each state is its own
    states = stream.gathered_state_dict()
    if rank == 0:
        torch.save(states, out_file)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_gathered_states_resume_every_rank(corpus, tokenizer, tokenizer_dir, tmp_path):
    out_file = str(tmp_path / "states.pt")
    # Spawned, not forked: a forked worker would inherit a process group that an earlier test in this pytest process
    # may have initialised (the in-process DeepSpeed tests), and could not initialise its own.
    torch.multiprocessing.start_processes(
        _two_rank_worker, args=(corpus["dir"], tokenizer_dir, 11, str(tmp_path / "init"), out_file), nprocs=2,
        start_method="spawn")
    states = torch.load(out_file)
    for rank in range(2):
        reference = list(islice(iter(TrainStream(corpus["dir"], tokenizer, SEQ_LEN, BATCH, rank, 2,
                                                 shuffle_block=16)), 11 + rank + 3))[11 + rank:]
        resumed = TrainStream(corpus["dir"], tokenizer, SEQ_LEN, BATCH, rank, 2, shuffle_block=16)
        resumed.load_gathered_state_dict(states)
        for want, have in zip(reference, islice(iter(resumed), 3), strict=True):
            assert torch.equal(want["input_ids"], have["input_ids"])
    with pytest.raises(DataSourceError, match="states of 2 ranks, this run has 4"):
        TrainStream(corpus["dir"], tokenizer, SEQ_LEN, BATCH, 0, 4).load_gathered_state_dict(states)
