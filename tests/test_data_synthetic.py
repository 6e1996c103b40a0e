"""The testbed's synthetic data source: the task's rules, its Bayes-optimal loss, and that the data pipeline reads it
like any other pre-tokenised source (sharded, resumable, deterministic)."""
from __future__ import annotations

import math
import os
from itertools import islice

import numpy as np
import pytest

from ds_orthoadam.data import TrainStream, load_tokenizer, validation_batches, validation_source
from ds_orthoadam.data.synthetic import (
    FIRST_CONTENT_ID,
    BigramBackcopy,
    SplitPlan,
    SyntheticTaskError,
    generate,
    main,
    read_task,
)

TASK = BigramBackcopy(vocab=16, triggers=6, offsets=3, concentration=0.3, task_seed=5)
LENGTH = 14  # documents of seq_len - 2 tokens: every packed sequence is BOS doc EOS
SEQ_LEN = LENGTH + 2


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("bigram-backcopy"))
    generate(out, TASK, SplitPlan(4, 300, LENGTH, seed=0), SplitPlan(1, 200, LENGTH, seed=1))
    return out


def copy_positions(doc: list[int], group: np.ndarray) -> dict[int, int]:
    """The rule written out per token: {position: copied token} for every token that follows a trigger which has a
    copy source in the document and was not itself a copy; every other token is a bigram draw."""
    copies: dict[int, int] = {}
    for position in range(1, len(doc)):
        trigger_group = group[doc[position - 1]]
        source = position - 2 - trigger_group
        if trigger_group >= 0 and source >= 0 and position - 1 not in copies:
            copies[position] = doc[source]
    return copies


def test_documents_follow_the_copy_rule_and_the_transition_table() -> None:
    transition, group = TASK.tables()
    assert sorted(np.bincount(group[group >= 0])) == [2, 2, 2]  # 6 triggers in 3 offset groups
    docs = TASK.sample(np.random.default_rng(0), 3000, 20).tolist()
    counts = np.zeros_like(transition)
    copies = 0
    for doc in docs:
        copied = copy_positions(doc, group)
        for position in range(1, len(doc)):
            if position in copied:
                assert doc[position] == copied[position]
                copies += 1
            else:
                counts[doc[position - 1], doc[position]] += 1
    assert 0.1 < copies / (len(docs) * 19) < 0.4  # triggers matter, and copies do not lock documents into loops
    draws = counts.sum(axis=1, keepdims=True)
    empirical = counts / draws
    # Bigram draws follow the table: every frequency within 5 binomial standard deviations of its probability.
    tolerance = 5 * np.sqrt(transition * (1 - transition) / draws) + 1e-3
    assert draws.min() > 100 and (np.abs(empirical - transition) <= tolerance).all()


def test_optimal_loss_equals_the_bayes_predictors_log_loss_on_the_same_documents() -> None:
    transition, group = TASK.tables()
    docs = TASK.sample(np.random.default_rng(1), 2000, LENGTH)
    log_loss, targets = 0.0, 0
    for doc in docs.tolist():
        log_loss += math.log(TASK.vocab)  # first content token: uniform; EOS at a known position costs 0
        copied = copy_positions(doc, group)
        for position in range(1, len(doc)):
            if position not in copied:
                log_loss -= math.log(transition[doc[position - 1], doc[position]])
        targets += len(doc) + 1
    # The realised log loss of the Bayes predictor estimates the conditional entropy that optimal_loss sums.
    assert TASK.optimal_loss(docs) == pytest.approx(log_loss / targets, abs=0.02)


def test_generation_is_deterministic_and_idempotent(generated, tmp_path) -> None:
    again = str(tmp_path / "again")
    generate(again, TASK, SplitPlan(4, 300, LENGTH, seed=0), SplitPlan(1, 200, LENGTH, seed=1))
    for split in ("train", "validation"):
        for name in sorted(os.listdir(os.path.join(generated, split))):
            if name.endswith(".bin") or name.endswith(".npy"):
                with open(os.path.join(generated, split, name), "rb") as a, open(os.path.join(again, split, name),
                                                                                  "rb") as b:
                    assert a.read() == b.read(), name
    shard = os.path.join(again, "train", "shard-00000.bin")
    before = os.stat(shard).st_mtime_ns
    generate(again, TASK, SplitPlan(4, 300, LENGTH, seed=0), SplitPlan(1, 200, LENGTH, seed=1))
    assert os.stat(shard).st_mtime_ns == before  # same task: nothing rewritten
    record = generate(again, TASK, SplitPlan(4, 300, LENGTH, seed=7), SplitPlan(1, 200, LENGTH, seed=1))
    assert record["train"]["seed"] == 7 and read_task(again)["train"]["seed"] == 7


def test_the_data_pipeline_reads_it_as_bos_document_eos_sequences(generated) -> None:
    tokenizer = load_tokenizer(os.path.join(generated, "tokenizer"))
    assert (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id) == (TASK.vocab_size, 1, 2)
    assert tokenizer.decode([FIRST_CONTENT_ID, FIRST_CONTENT_ID + 5]) == "w0 w5"
    assert tokenizer("w0 w5", add_special_tokens=False)["input_ids"] == [FIRST_CONTENT_ID, FIRST_CONTENT_ID + 5]
    _, group = TASK.tables()
    stream = TrainStream(generated, tokenizer, SEQ_LEN, 4, rank=0, world_size=1)
    for batch in islice(iter(stream), 5):
        ids = batch["input_ids"]
        assert (ids[:, 0] == 1).all() and (ids[:, -1] == 2).all()
        for row in (ids[:, 1:-1] - FIRST_CONTENT_ID).tolist():
            assert all(0 <= token < TASK.vocab for token in row)
            assert all(row[position] == token for position, token in copy_positions(row, group).items())
    batches = validation_batches(validation_source(generated), tokenizer, SEQ_LEN, 8, num_docs=200)
    assert sum(int(batch["input_ids"].shape[0]) for batch in batches) == 200


def test_ranks_read_disjoint_shards_and_resume_continues_exactly(generated) -> None:
    tokenizer = load_tokenizer(os.path.join(generated, "tokenizer"))
    ranks = [TrainStream(generated, tokenizer, SEQ_LEN, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    seen = [{tuple(row) for batch in islice(iter(stream), 20) for row in batch["input_ids"].tolist()}
            for stream in ranks]
    assert not seen[0] & seen[1]
    stream = TrainStream(generated, tokenizer, SEQ_LEN, 4, rank=0, world_size=1, seed=3)
    iterator = iter(stream)
    list(islice(iterator, 7))
    state = stream.state_dict()
    expected = [batch["input_ids"] for batch in islice(iterator, 5)]
    resumed = TrainStream(generated, tokenizer, SEQ_LEN, 4, rank=0, world_size=1, seed=3)
    resumed.load_state_dict(state)
    assert all((a == b["input_ids"]).all() for a, b in zip(expected, islice(iter(resumed), 5)))


@pytest.mark.parametrize("fields, word", [
    (dict(triggers=16, vocab=16), "triggers"),
    (dict(offsets=7, triggers=6), "offsets"),
    (dict(concentration=0.0), "concentration"),
    (dict(vocab=1, triggers=0), "vocab"),
])
def test_bad_task_parameters_name_the_parameter(fields, word) -> None:
    with pytest.raises(SyntheticTaskError, match=word):
        BigramBackcopy(**fields)


def test_cli_reports_bad_parameters_in_one_line(tmp_path, capsys) -> None:
    assert main(["--out", str(tmp_path / "x"), "--triggers", "64"]) == 2
    error = capsys.readouterr().err.strip()
    assert "triggers must be in [0, vocab - 1]" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "x" / "task.json").exists()
