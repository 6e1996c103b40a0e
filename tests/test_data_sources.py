"""Sources: local json.gz / jsonl / txt reading against hand-parsed references, split resolution, bad input."""
import gzip
import json
import os
import socket
import warnings

import pytest

from data_fixtures import make_documents, write_json_shard
from ds_orthoadam.data.errors import DataSourceError
from ds_orthoadam.data.sources import resolve_source, validation_source


def test_c4_directory_reads_every_shard_in_order(corpus):
    source = resolve_source(corpus["dir"], "train")
    assert source.kind == "json" and source.num_shards == 3
    with gzip.open(source.shards[1], "rt") as handle:
        reference = [json.loads(line)["text"] for line in handle]
    assert list(source.open_shard(1)) == reference == corpus["train"][1]
    assert list(source.open_shard(1, start_doc=17)) == reference[17:]
    assert list(source.documents()) == [doc for shard in corpus["train"] for doc in shard]
    assert list(resolve_source(corpus["dir"], "validation").documents()) == corpus["validation"]


def test_text_files_are_split_into_paragraphs(tmp_path):
    paragraphs = make_documents(25)
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraph.replace(": ", ":\n") for paragraph in paragraphs) + "\n")
    source = resolve_source(str(tmp_path / "*.txt"))
    assert source.kind == "text"
    expected = [paragraph.replace(": ", ":\n") for paragraph in paragraphs]
    got = [doc.rstrip("\n") for doc in source.documents()]
    assert got == expected
    assert [doc.rstrip("\n") for doc in source.open_shard(0, start_doc=20)] == expected[20:]


def test_globs_and_comma_lists(corpus, tmp_path):
    jsonl = write_json_shard(str(tmp_path / "extra.jsonl"), ["alpha", "beta"])
    source = resolve_source(f"{corpus['dir']}/c4-train.00000-*.json.gz,{jsonl}")
    assert source.num_shards == 2 and list(source.open_shard(1)) == ["alpha", "beta"]


def test_validation_is_derived_or_explicit(corpus, tmp_path):
    assert list(validation_source(corpus["dir"]).documents()) == corpus["validation"]
    derived = validation_source(os.path.join(corpus["dir"], "c4-train.*.json.gz"))
    assert list(derived.documents()) == corpus["validation"]
    text = tmp_path / "notes.txt"
    text.write_text("one paragraph\n")
    with pytest.raises(DataSourceError, match="pass the validation files with --val-data"):
        validation_source(str(text))
    train_only = tmp_path / "train-only"
    train_only.mkdir()
    write_json_shard(str(train_only / "c4-train.00000-of-00001.json.gz"), ["x"])
    with pytest.raises(DataSourceError, match="no c4-validation.* shards .*; pass the validation files with --val-data"):
        validation_source(str(train_only))
    assert validation_source(str(text), val_data=str(text)).shards == (str(text),)


@pytest.mark.parametrize("name,content,pass_directory,message", [
    ("missing.json.gz", None, False, "no such file"),
    ("nothing-*.jsonl", None, False, "matches no file"),
    ("empty.jsonl", "", False, "is empty"),
    ("table.csv", "a,b\n", False, "unsupported file type"),
    ("notes.txt", "a\n", True, "has no c4-train"),
])
def test_bad_paths_fail_with_a_clear_message(tmp_path, name, content, pass_directory, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataSourceError, match=message):
        resolve_source(str(tmp_path if pass_directory else tmp_path / name))


def test_malformed_json_lines_are_skipped_with_a_counted_warning_or_fail_in_strict_mode(tmp_path):
    path = tmp_path / "c4-train.00000-of-00001.json"
    good = [json.dumps({"text": f"document {i}"}) for i in range(6)]
    path.write_bytes("\n".join(good[:2] + ['{"text": "cut off', *good[2:4], '{"text": "bad \udcff"}'.encode(
        "utf-8", "surrogateescape").decode("latin1")] + good[4:]).encode("latin1") + b"\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        documents = list(resolve_source(str(path)).documents())
    assert documents == [f"document {i}" for i in range(6)]
    messages = [str(w.message) for w in caught if "malformed" in str(w.message)]
    assert len(messages) == 1 and "skipped 2 malformed" in messages[0] and f"{path}:3 " in messages[0]
    with pytest.raises(DataSourceError, match=f"{path}:3: malformed JSON"):
        list(resolve_source(str(path), strict=True).documents())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert list(resolve_source(str(path)).open_shard(0, start_doc=3)) == [f"document {i}" for i in range(3, 6)]


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "c4-train.00000-of-00001.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataSourceError, match=":2: bytes that are not UTF-8"):
        list(resolve_source(str(path), strict=True).documents())
    text = tmp_path / "latin1.txt"
    text.write_bytes(b"caf\xe9\n")
    with pytest.raises(DataSourceError, match="is not UTF-8 text.*iconv"):
        list(resolve_source(str(text)).documents())


def test_text_that_is_not_a_string_is_an_empty_document_or_fails_in_strict_mode(tmp_path):
    good = [json.dumps({"text": f"document {i}"}) for i in range(8)]
    plain = tmp_path / "numbers.jsonl"  # read by HF datasets, which passes the number through
    plain.write_text("\n".join(good[:3] + [json.dumps({"text": 12345})] + good[3:]) + "\n")
    recovered = tmp_path / "mixed.jsonl"  # a malformed line too: the whole file is re-read line by line
    recovered.write_text("\n".join(good[:3] + [json.dumps({"text": [1, 2]})] + good[3:6] + ["{cut"] + good[6:]) + "\n")
    expected = [f"document {i}" for i in range(3)] + [""] + [f"document {i}" for i in range(3, 8)]
    for path, where in ((plain, "document 3"), (recovered, "line 4")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert list(resolve_source(str(path)).documents()) == expected  # the line keeps its index
            assert list(resolve_source(str(path)).open_shard(0, start_doc=5)) == expected[5:]
        assert any(f"with a 'text' that is not a string as empty documents; first at {where}" in str(w.message)
                   for w in caught)
        with pytest.raises(DataSourceError, match=f"{where} has a 'text' that is not a string"):
            list(resolve_source(str(path), strict=True).documents())


def test_corrupt_gzip_files_name_the_file(tmp_path):
    texts = make_documents(400)
    whole = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    truncated = tmp_path / "c4-train.00000-of-00001.json.gz"
    truncated.write_bytes(whole[:len(whole) // 2])  # a valid start: only reading it finds the cut
    with pytest.raises(DataSourceError, match=f"{truncated} cannot be decompressed.*truncated or corrupt"):
        list(resolve_source(str(truncated)).documents())
    plain = tmp_path / "plain.json.gz"
    plain.write_text(json.dumps({"text": "not compressed"}) + "\n")
    with pytest.raises(DataSourceError, match=f"{plain} is not a readable gzip file"):
        resolve_source(str(plain))  # found at start-up, before any training
    empty = tmp_path / "empty.json.gz"
    empty.write_bytes(gzip.compress(b""))
    with pytest.raises(DataSourceError, match=f"{empty} holds no data once decompressed"):
        resolve_source(str(empty))


def test_missing_text_field(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"body": "x"}\n')
    with pytest.raises(DataSourceError, match="no 'text' field"):
        list(resolve_source(str(path)).documents())


def test_hub_source_fails_at_once_offline_without_touching_the_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the offline check must come before any network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for data in ("c4", "allenai/c4"):
        with pytest.raises(DataSourceError, match="offline mode is on.*c4-train.*--data /path/to/that/directory"):
            resolve_source(data)


def test_hub_source_names_the_c4_files(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    source = resolve_source("c4", "validation")
    assert source.num_shards == 8 and source.is_hub
    assert source.shards[7] == "hf://datasets/allenai/c4/en/c4-validation.00007-of-00008.json.gz"
    assert resolve_source("c4").shards[0] == "hf://datasets/allenai/c4/en/c4-train.00000-of-01024.json.gz"
