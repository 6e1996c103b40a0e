"""Tokenizer: HF fast tokenizer ids equal sentencepiece ids; loading paths; vocabulary check; CLI."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from data_fixtures import make_documents
from ds_orthoadam.data.errors import TokenizerError
from ds_orthoadam.data.sources import HUB_ALIASES
from ds_orthoadam.data.tokenizer import check_vocab_fits, encode_documents, load_tokenizer, main

TRICKY = ["Hello world", "  two  spaces\tand a tab\n new line", "digits 12345 and 3.14159", "ünïcödé 日本語 🙂",
          "", " leading", "trailing  ", "a\n\nb", "literal </s> and <s> and <unk> stay text", "\x00\x01 control"]


def test_hf_tokenizer_matches_sentencepiece(tokenizer, tokenizer_dir):
    texts = TRICKY + make_documents(200, seed=7)
    reference = spm.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, "tokenizer.model")).encode(texts)
    assert encode_documents(tokenizer, texts) == reference
    # the ordinary transformers call (what other tools use) agrees too
    assert tokenizer(texts[:50], add_special_tokens=False)["input_ids"] == reference[:50]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)


def test_load_from_a_sentencepiece_model_file(tokenizer, tokenizer_dir):
    from_model = load_tokenizer(os.path.join(tokenizer_dir, "tokenizer.model"))
    texts = TRICKY + make_documents(50, seed=8)
    assert encode_documents(from_model, texts) == encode_documents(tokenizer, texts)


def test_vocabulary_must_fit_the_model(tokenizer):
    check_vocab_fits(tokenizer, 600)
    with pytest.raises(TokenizerError, match="600 tokens but the model's vocabulary holds 512.*vocab_size=600"):
        check_vocab_fits(tokenizer, 512)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist; train one"):
        load_tokenizer(str(tmp_path / "nope"))


def test_cli_trains_and_reports_bad_sizes(corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["--data", corpus["dir"], "--out", str(out), "--vocab-size", "400"]) == 0
    assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= set(os.listdir(out))
    assert len(load_tokenizer(str(out))) == 400
    assert main(["--data", corpus["dir"], "--out", str(tmp_path / "big"), "--vocab-size", "100000"]) == 2
    assert "Vocabulary size too high" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["--data", corpus["dir"], "--out", str(tmp_path / "none"), "--sample-docs", "-1"])
    assert refused.value.code == 2 and "--sample-docs: must be an integer >= 1, got -1" in capsys.readouterr().err


def test_directory_without_tokenizer_files_is_refused(tmp_path):
    """transformers 5 would silently build an empty one-token tokenizer from a directory with only a model config."""
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path))


def _make_tokenizer_dry_run(data: str) -> tuple[str, str]:
    """What `make tokenizer TOKENIZER_DATA=<data>` would run (make -n): all of it, and the tokenizer's command line."""
    repo = Path(__file__).resolve().parent.parent
    venv = Path(sys.executable).parent.parent
    dry_run = subprocess.run(["make", "--no-print-directory", "-n", "-o", f"{venv}/.installed", "tokenizer",
                              f"VENV={venv}", f"TOKENIZER_DATA={data}"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout
    return dry_run, next(line for line in dry_run.splitlines() if "ds_orthoadam.data.tokenizer" in line)


@pytest.mark.parametrize("data,offline,builds_demo_corpus", [
    ("data/demo", True, True), ("c4", False, False), ("/data/c4/en", True, False)])
def test_make_tokenizer_runs_online_only_for_the_hub(data, offline, builds_demo_corpus):
    """The README's `make tokenizer TOKENIZER_DATA=c4 ...` must not run in offline mode (the hub source refuses it)."""
    dry_run, command = _make_tokenizer_dry_run(data)
    assert ("HF_HUB_OFFLINE=1" in command) == offline
    assert ("ds_orthoadam.data.demo_corpus" in dry_run) == builds_demo_corpus


@pytest.mark.parametrize("alias", HUB_ALIASES)
def test_make_tokenizer_runs_online_for_every_name_the_data_package_streams_from_the_hub(alias):
    """The Makefile reads the hub's names from data/sources.py: each of them, and no other, runs online."""
    assert "HF_HUB_OFFLINE=1" not in _make_tokenizer_dry_run(alias)[1]
    assert "HF_HUB_OFFLINE=1" in _make_tokenizer_dry_run(f"{alias}-local")[1]


def test_cli_refuses_a_file_as_out(corpus, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["--data", corpus["dir"], "--out", str(tmp_path / "afile"), "--vocab-size", "400"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out") and "is an existing file" in err[0]
