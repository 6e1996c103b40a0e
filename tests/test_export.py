"""ds-orthoadam-export's handling of bad input: output paths, run.json, the recorded tokenizer path.

The checkpoint reader is replaced by a model's own state dict, so these run in seconds without a training run (the
real export of a trained checkpoint is covered by test_train_e2e)."""
import json

import pytest

from ds_orthoadam import export
from ds_orthoadam.errors import OutputPathError
from ds_orthoadam.models import build_config, build_model

MODEL_ARGS = {"name": "llama-tiny", "vocab_size": 600, "max_seq_len": 32}


@pytest.fixture
def run_dir(tmp_path, tokenizer_dir):
    """A run directory holding only run.json (with an absolute tokenizer path, as a fresh run records it)."""
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / "run.json").write_text(json.dumps({"model_args": MODEL_ARGS, "tokenizer": tokenizer_dir}))
    return directory


@pytest.fixture
def fake_checkpoint(monkeypatch):
    """export_checkpoint reads the weights of a freshly built model instead of a DeepSpeed checkpoint."""
    state = build_model(**MODEL_ARGS).state_dict()
    monkeypatch.setattr(export, "export_fp32_state_dict", lambda directory, tag: dict(state))


def test_export_writes_the_weights(tmp_path, tokenizer, fake_checkpoint):
    out = export.export_checkpoint(tmp_path, "t", build_config(**MODEL_ARGS), tokenizer, tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


@pytest.mark.parametrize("target", ["a-file", "a-file/below", "/proc/e1"])
def test_export_to_a_file_or_unwritable_path_is_refused(tmp_path, tokenizer, fake_checkpoint, target):
    (tmp_path / "a-file").write_text("not a directory")
    out = target if target.startswith("/") else tmp_path / target
    with pytest.raises(OutputPathError, match="--export-dir"):
        export.export_checkpoint(tmp_path, "t", build_config(**MODEL_ARGS), tokenizer, out)
    assert (tmp_path / "a-file").read_text() == "not a directory"


def test_export_that_writes_no_weights_is_an_error(tmp_path, tokenizer, fake_checkpoint, monkeypatch):
    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", lambda self, *args, **kwargs: None)
    with pytest.raises(export.ExportError, match="wrote no model.safetensors"):
        export.export_checkpoint(tmp_path, "t", build_config(**MODEL_ARGS), tokenizer, tmp_path / "hf")


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "exported" not in captured.out
    return lines[0]


def test_cli_refuses_a_file_as_out(run_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert export.main(["--run-dir", str(run_dir), "--out", str(tmp_path / "afile")]) == 2
    assert "--out" in one_error_line(capsys) and (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("content, problem", [('{"model_args": ', "not readable JSON"),
                                              ('{"tokenizer": "x"}', "no model_args"),
                                              ('[1, 2]', "no model_args"),
                                              ('{"model_args": {"name": "nope"}}', "do not build a model")])
def test_cli_bad_run_json_is_one_line(run_dir, tmp_path, capsys, content, problem):
    (run_dir / "run.json").write_text(content)
    assert export.main(["--run-dir", str(run_dir), "--out", str(tmp_path / "hf")]) == 2
    assert problem in one_error_line(capsys)


def test_relative_tokenizer_path_names_run_json_and_the_option(run_dir, tmp_path, tokenizer_dir, capsys,
                                                                 monkeypatch):
    (run_dir / "run.json").write_text(json.dumps({"model_args": MODEL_ARGS, "tokenizer": "data/demo/tokenizer"}))
    monkeypatch.chdir(tmp_path)
    assert export.main(["--run-dir", str(run_dir), "--out", str(tmp_path / "hf")]) == 2
    line = one_error_line(capsys)
    assert "recorded in" in line and "run.json" in line and "--tokenizer" in line
    # --tokenizer overrides the recorded path: the export gets past the tokenizer to the (absent) checkpoints
    assert export.main(["--run-dir", str(run_dir), "--out", str(tmp_path / "hf"), "--tokenizer", tokenizer_dir]) == 2
    assert "no complete checkpoint" in one_error_line(capsys)


def test_tokenizer_larger_than_the_model_is_refused(run_dir, tmp_path, capsys):
    (run_dir / "run.json").write_text(json.dumps({"model_args": MODEL_ARGS | {"vocab_size": 100},
                                                  "tokenizer": json.loads((run_dir / "run.json").read_text())
                                                  ["tokenizer"]}))
    assert export.main(["--run-dir", str(run_dir), "--out", str(tmp_path / "hf")]) == 2
    assert "does not belong to this run" in one_error_line(capsys)
