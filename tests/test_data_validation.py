"""Validation set: first N documents, packed like training, identical every time, split across ranks."""
import numpy as np
import pytest
import torch

from ds_orthoadam.data.errors import DataSourceError
from ds_orthoadam.data.tokenizer import encode_documents
from ds_orthoadam.data.validation import validation_batches


def test_first_n_documents_packed_like_training(corpus, tokenizer):
    seq_len, num_docs = 24, 12
    stream = np.concatenate([ids + [tokenizer.eos_token_id] for ids in
                             encode_documents(tokenizer, corpus["validation"][:num_docs])])
    rows = len(stream) // (seq_len - 1)
    expected = np.concatenate([np.full((rows, 1), tokenizer.bos_token_id),
                               stream[: rows * (seq_len - 1)].reshape(rows, -1)], axis=1)
    batches = list(validation_batches(corpus["dir"], tokenizer, seq_len, 5, num_docs=num_docs))
    got = torch.cat([batch["input_ids"] for batch in batches]).numpy()
    np.testing.assert_array_equal(got, expected)
    again = list(validation_batches(corpus["dir"], tokenizer, seq_len, 5, num_docs=num_docs))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again, strict=True))


def test_ranks_split_the_sequences(corpus, tokenizer):
    whole = validation_batches(corpus["dir"], tokenizer, 32, 3, num_docs=20)
    parts = [validation_batches(corpus["dir"], tokenizer, 32, 3, num_docs=20, rank=r, world_size=2) for r in (0, 1)]
    rows = {tuple(row) for part in parts for batch in part for row in batch["input_ids"].tolist()}
    assert sum(part.num_sequences for part in parts) == whole.num_sequences == len(rows)
    assert whole.num_predicted_tokens == whole.num_sequences * 31


def test_pad_mode_scores_only_real_tokens(corpus, tokenizer):
    validation = validation_batches(corpus["dir"], tokenizer, 64, 4, num_docs=10, mode="pad")
    expected = sum(len(ids) + 1 for ids in encode_documents(tokenizer, corpus["validation"][:10]))
    real = sum(int(batch["attention_mask"].sum()) for batch in validation)
    assert real == expected + validation.num_sequences  # every document token + EOS, plus one BOS per sequence


def test_too_short_and_too_few(corpus, tokenizer):
    with pytest.raises(DataSourceError, match="less than one sequence"):
        list(validation_batches(corpus["dir"], tokenizer, 100_000, 2, num_docs=3))
    with pytest.warns(UserWarning, match="only 30 documents"):
        assert len(validation_batches(corpus["dir"], tokenizer, 32, 2)) > 0
