"""Fixtures shared by the test modules: a small C4-format corpus and a SentencePiece tokenizer trained on it.

Built once per session (training the tokenizer takes a few seconds) and only when a test asks for them. A module may
define a fixture of the same name for its own needs (test_train_e2e.py's plain-text ``corpus``); pytest then uses
the module's.
"""
from __future__ import annotations

import pytest
from data_fixtures import make_documents, write_c4_directory


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """Three train shards (40 documents each) and one validation shard (30 documents)."""
    documents = make_documents(150)
    train = [documents[0:40], documents[40:80], documents[80:120]]
    directory = write_c4_directory(str(tmp_path_factory.mktemp("c4")), train, documents[120:150])
    return {"dir": directory, "train": train, "validation": documents[120:150]}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus) -> str:
    from ds_orthoadam.data.tokenizer import train_tokenizer

    out = str(tmp_path_factory.mktemp("tokenizer"))
    train_tokenizer([doc for shard in corpus["train"] for doc in shard] + make_documents(300, seed=1), out,
                    vocab_size=600)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from ds_orthoadam.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)
