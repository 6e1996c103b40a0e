"""Pre-tokenised shards: same documents as tokenising on the fly, same stream, dtype limits."""
import itertools
import json

import pytest
import torch

from ds_orthoadam.data.errors import DataSourceError, TokenizerError
from ds_orthoadam.data.pretokenize import choose_dtype, main
from ds_orthoadam.data.token_shards import read_index
from ds_orthoadam.data.sources import resolve_source
from ds_orthoadam.data.stream import TrainStream
from ds_orthoadam.data.tokenizer import encode_documents
from ds_orthoadam.data.validation import validation_batches


@pytest.fixture(scope="module")
def pretokenized(corpus, tokenizer_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tok"))
    assert main(["--data", corpus["dir"], "--tokenizer", tokenizer_dir, "--out", out, "--workers", "2"]) == 0
    return out


def test_shards_hold_the_tokenised_documents(pretokenized, corpus, tokenizer):
    index = read_index(f"{pretokenized}/train")
    assert index["dtype"] == "uint16" and [s["documents"] for s in index["shards"]] == [40, 40, 40]
    source = resolve_source(pretokenized)
    assert source.kind == "tokens"
    for shard, texts in enumerate(corpus["train"]):
        got = [doc.tolist() for doc in source.open_shard(shard)]
        assert got == encode_documents(tokenizer, texts)
        assert [doc.tolist() for doc in source.open_shard(shard, start_doc=33)] == got[33:]


def test_stream_and_validation_are_identical_to_the_text_source(pretokenized, corpus, tokenizer):
    for rank in range(2):
        from_text = TrainStream(corpus["dir"], tokenizer, 32, 4, rank, 2, shuffle_block=16)
        from_tokens = TrainStream(pretokenized, tokenizer, 32, 4, rank, 2, shuffle_block=16)
        for a, b in itertools.islice(zip(from_text, from_tokens), 40):
            assert torch.equal(a["input_ids"], b["input_ids"])
    text_batches = list(validation_batches(corpus["dir"], tokenizer, 32, 4, num_docs=30))
    token_batches = list(validation_batches(pretokenized, tokenizer, 32, 4, num_docs=30))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(text_batches, token_batches, strict=True))


def test_files_and_globs_get_their_validation_split_not_a_copy_of_training(corpus, tokenizer_dir, tmp_path):
    out = str(tmp_path / "from-glob")
    assert main(["--data", f"{corpus['dir']}/c4-train.*.json.gz", "--tokenizer", tokenizer_dir, "--out", out]) == 0
    assert [s["documents"] for s in read_index(f"{out}/validation")["shards"]] == [len(corpus["validation"])]
    assert [s["documents"] for s in read_index(f"{out}/train")["shards"]] == [40, 40, 40]
    explicit = str(tmp_path / "explicit")
    first_train_shard = f"{corpus['dir']}/c4-train.00000-of-00003.json.gz"
    assert main(["--data", f"{corpus['dir']}/c4-train.*.json.gz", "--val-data", first_train_shard,
                 "--tokenizer", tokenizer_dir, "--out", explicit, "--splits", "validation"]) == 0
    assert [s["documents"] for s in read_index(f"{explicit}/validation")["shards"]] == [40]


def test_dtype_limits():
    assert choose_dtype(65536) == "uint16" and choose_dtype(65537) == "uint32"
    with pytest.raises(TokenizerError, match="beyond uint16.*--dtype uint32"):
        choose_dtype(100_000, "uint16")


def test_cli_rejects_uint16_for_a_large_vocabulary(corpus, tokenizer_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("transformers.PreTrainedTokenizerFast.__len__", lambda self: 70_000)  # a 70k vocabulary
    assert main(["--data", corpus["dir"], "--tokenizer", tokenizer_dir, "--out", str(tmp_path), "--dtype",
                 "uint16"]) == 2
    assert "beyond uint16" in capsys.readouterr().err


def test_stream_refuses_shards_of_another_tokenizer(pretokenized, corpus, tmp_path):
    from ds_orthoadam.data.tokenizer import train_tokenizer

    other = train_tokenizer(corpus["validation"] * 3, str(tmp_path / "other"), vocab_size=350)
    with pytest.raises(TokenizerError, match="pre-tokenised with another tokenizer"):
        TrainStream(pretokenized, other, 32, 4)


# ------------------------------------------------------------------------------------------------- damaged output

@pytest.fixture
def copy_of(pretokenized, tmp_path):
    """A private copy of the pre-tokenised directory, to damage."""
    import shutil

    shutil.copytree(pretokenized, tmp_path / "copy")
    return tmp_path / "copy"


def test_truncated_shard_is_refused_with_the_file_and_the_fix(copy_of):
    shard = copy_of / "train" / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:1000])
    source = resolve_source(str(copy_of))
    with pytest.raises(DataSourceError, match=r"shard-00000\.bin holds 500 tokens.*re-run .*pretokenize"):
        list(source.open_shard(0))


def test_shard_whose_index_count_disagrees_is_refused(copy_of):
    index = json.loads((copy_of / "train" / "index.json").read_text())
    index["shards"][1]["num_tokens"] += 1
    (copy_of / "train" / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataSourceError, match="shard-00001.bin holds"):
        list(resolve_source(str(copy_of)).open_shard(1))


@pytest.mark.parametrize("damage, problem", [(lambda index: index | {"shards": []}, "lists no shards"),
                                             (lambda index: [index], "not a pre-tokenised index"),
                                             (lambda index: index | {"shards": [1]}, "not objects")])
def test_unusable_index_is_refused(copy_of, damage, problem):
    path = copy_of / "train" / "index.json"
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    with pytest.raises(DataSourceError, match=problem):
        resolve_source(str(copy_of))


def test_missing_shard_file_is_refused_when_the_source_is_resolved(copy_of):
    (copy_of / "train" / "shard-00002.bin").unlink()
    with pytest.raises(DataSourceError, match="shard-00002.bin"):
        resolve_source(str(copy_of))


@pytest.mark.parametrize("option, value", [("--max-shards", "-1"), ("--max-shards", "0"), ("--workers", "-3"),
                                           ("--workers", "0")])
def test_cli_refuses_counts_below_one(corpus, tokenizer_dir, tmp_path, capsys, option, value):
    assert main(["--data", corpus["dir"], "--tokenizer", tokenizer_dir, "--out", str(tmp_path / "o"),
                 option, value]) == 2
    assert f"{option} must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_max_shards_limits_the_shards(corpus, tokenizer_dir, tmp_path):
    assert main(["--data", corpus["dir"], "--tokenizer", tokenizer_dir, "--out", str(tmp_path), "--max-shards", "1",
                 "--splits", "train"]) == 0
    assert len(read_index(f"{tmp_path}/train")["shards"]) == 1


def test_cli_refuses_a_file_as_out(corpus, tokenizer_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["--data", corpus["dir"], "--tokenizer", tokenizer_dir, "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out") and "is an existing file" in err[0]
