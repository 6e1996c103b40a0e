"""Packing arithmetic: cut_sequences / collate against a numpy reference."""
import numpy as np
import pytest
import torch

from ds_orthoadam.data.packing import IGNORE_INDEX, collate, cut_sequences

BOS, EOS = 1, 2


def random_documents(count=40, seed=0):
    rng = np.random.default_rng(seed)
    return [(index, rng.integers(3, 500, size=rng.integers(0, 60)).tolist()) for index in range(count)]


@pytest.mark.parametrize("seq_len", [2, 7, 64])
def test_pack_emits_every_token_once_in_order(seq_len):
    documents = random_documents()
    stream = np.concatenate([np.array(ids + [EOS]) for _, ids in documents if ids])
    sequences = [sequence for sequence, _ in cut_sequences(documents, seq_len, BOS, EOS, "pack")]
    body = seq_len - 1
    assert len(sequences) == len(stream) // body
    assert all(len(sequence) == seq_len and sequence[0] == BOS for sequence in sequences)
    expected = stream[: len(sequences) * body].reshape(-1, body)
    np.testing.assert_array_equal(np.array([sequence[1:] for sequence in sequences]), expected)


def test_pad_keeps_one_document_per_sequence():
    documents = random_documents(seed=1)
    seq_len = 16
    sequences = list(cut_sequences(documents, seq_len, BOS, EOS, "pad"))
    rebuilt: dict[int, list[int]] = {}
    for sequence, (cursor, _) in sequences:
        assert sequence[0] == BOS and 2 <= len(sequence) <= seq_len
        rebuilt.setdefault(cursor, []).extend(sequence[1:])
    assert rebuilt == {index: ids + [EOS] for index, ids in documents if ids}


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_restart_from_any_position_continues_exactly(mode):
    documents = random_documents(seed=2)
    full = list(cut_sequences(documents, 10, BOS, EOS, mode))
    for k in (0, 3, len(full) // 2, len(full) - 2):
        cursor, offset = full[k][1]
        resumed = cut_sequences(documents[cursor:], 10, BOS, EOS, mode, skip_tokens=offset)
        assert [sequence for sequence, _ in resumed] == [sequence for sequence, _ in full[k + 1:]]


def test_collate_masks_padding_only_in_pad_mode():
    batch = collate([[BOS, 5, 6, EOS], [BOS, 7]], 5, pad_id=EOS, mode="pad")
    assert batch["input_ids"].tolist() == [[BOS, 5, 6, EOS, EOS], [BOS, 7, EOS, EOS, EOS]]
    assert batch["labels"].tolist() == [[BOS, 5, 6, EOS, IGNORE_INDEX], [BOS, 7] + [IGNORE_INDEX] * 3]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    packed = collate([[BOS, 5, 6], [BOS, 8, 9]], 3, pad_id=EOS, mode="pack")
    assert set(packed) == {"input_ids", "labels"} and torch.equal(packed["input_ids"], packed["labels"])
