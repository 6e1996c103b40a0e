"""ds-orthoadam-analyze end to end on saved tiny model directories, perplexity against transformers' loss, bad input."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import matplotlib.image
import pytest
import torch
from transformers import DistilBertConfig

from ds_orthoadam.analysis.cli import main
from ds_orthoadam.analysis.loading import load_causal_lm, load_matching_tokenizer
from ds_orthoadam.analysis.perplexity import perplexity
from ds_orthoadam.data import resolve_source, validation_batches
from tests.analysis_fixtures import save_tiny_model, write_corpus

QUANT = "w8-sym-channel,w4-sym-channel,w4-asym-group128,w8a8-token"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    return {
        "corpus": write_corpus(str(root / "data")),
        "gpt2": save_tiny_model(str(root / "gpt2-softmax"), "gpt2-tiny", "softmax"),
        "llama": save_tiny_model(str(root / "llama-softmax1"), "llama-tiny", "softmax1", seed=1),
        "root": root,
    }


def _run(workspace, *extra, models=("gpt2", "llama"), data="dir", samples="12", out="out") -> int:
    argv = []
    for model in models:
        argv += ["--model", workspace.get(model, model)]
    argv += ["--data", workspace["corpus"].get(data, data), "--samples", samples, "--seq-len", "24",
             "--batch-size", "4", "--out", str(workspace["root"] / out), *extra]
    return main(argv)


def test_cli_compares_two_models_in_json_markdown_and_plots(workspace):
    assert _run(workspace, "--quant", QUANT) == 0
    out = workspace["root"] / "out"
    report = json.loads((out / "analysis.json").read_text())
    labels = [entry["label"] for entry in report["models"]]
    assert labels == ["gpt2-softmax", "llama-softmax1"]
    for entry in report["models"]:
        layers = entry["model"]["layers"]
        assert all(len(values) == layers for values in entry["per_layer"].values())
        metrics = entry["metrics"]
        assert 0.0 <= metrics["first_token_share"] <= 1.0
        assert metrics["excess_kurtosis_rest"] == pytest.approx(metrics["kurtosis_rest"] - 3.0)
        assert metrics["max_abs_rest"] == pytest.approx(sum(entry["per_layer"]["max_abs_rest"]) / layers)
        assert entry["data"]["first_token_is_bos_fraction"] == 1.0
        assert [r["scheme"] for r in entry["quantization"]] == QUANT.split(",")
        for result in entry["quantization"]:
            assert result["penalty"] == pytest.approx(result["perplexity"] - entry["perplexity"])
    assert report["models"][1]["model"]["attention_implementation"] == "softmax1"  # analysed as softmax-1

    markdown = (out / "report.md").read_text()
    _assert_tables_are_rectangular(markdown)
    for label in labels:
        assert f"| {label} | sym-channel |" in markdown and f"| {label} | W8A8 | per-token |" in markdown
    for plot in ("first_token_share", "kurtosis", "max_activation", "attention_maps", "activation_map",
                 "perplexity_vs_bits"):
        assert f"({plot}.png)" in markdown
        assert matplotlib.image.imread(out / f"{plot}.png").ndim == 3


def _assert_tables_are_rectangular(markdown: str, minimum: int = 4) -> None:
    """Every row of each Markdown table has as many cells as its header (a stray '|' would break it)."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(len(re.findall(r"(?<!\\)\|", line)))
        elif current:
            tables.append(current)
            current = []
    assert len(tables) >= minimum
    for cells in tables:
        assert len(set(cells)) == 1, cells


def test_reported_perplexity_matches_transformers_loss(workspace):
    out = workspace["root"] / "txt"
    assert _run(workspace, "--quant", "none", "--mode", "pad", models=("llama",), data="txt", out="txt") == 0
    reported = json.loads((out / "analysis.json").read_text())["models"][0]["perplexity"]
    model = load_causal_lm(workspace["llama"])
    tokenizer = load_matching_tokenizer(model, workspace["llama"])
    batches = validation_batches(resolve_source(workspace["corpus"]["txt"], "validation"), tokenizer, 24, 4, 12,
                                 mode="pad")
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
            predicted = int((labels[:, 1:] != -100).sum())
            total, count = total + float(loss) * predicted, count + predicted
    assert reported == pytest.approx(math.exp(total / count), rel=1e-5)
    assert perplexity(model, batches) == pytest.approx(reported, rel=1e-6)
    assert any("attention_mask" in batch and batch["attention_mask"].sum() < batch["attention_mask"].numel()
               for batch in batches)  # padding really occurred


def _error(capsys) -> str:
    return capsys.readouterr().err


def test_missing_model_directory_fails_before_any_model_is_analysed(workspace, capsys):
    assert _run(workspace, models=("gpt2", "/nonexistent/model"), out="missing") == 2
    assert "model directory /nonexistent/model does not exist" in _error(capsys)
    assert not (workspace["root"] / "missing").exists()


def test_directory_without_config_and_non_causal_model(workspace, capsys):
    empty = workspace["root"] / "empty"
    empty.mkdir()
    assert _run(workspace, models=(str(empty),)) == 2
    assert "no config.json" in _error(capsys)
    encoder = workspace["root"] / "distilbert"
    DistilBertConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=1, n_heads=2).save_pretrained(encoder)
    assert _run(workspace, models=(str(encoder),)) == 2
    assert "not a causal language model" in _error(capsys)


def test_model_directory_without_tokenizer_points_to_the_option(workspace, capsys):
    bare = workspace["root"] / "no-tokenizer"
    load_causal_lm(workspace["gpt2"]).save_pretrained(bare)
    assert _run(workspace, models=(str(bare),)) == 2
    assert "holds no tokenizer" in (message := _error(capsys)) and "--tokenizer" in message
    assert _run(workspace, "--tokenizer", workspace["gpt2"], "--quant", "none", models=(str(bare),), out="bare") == 0


def test_zero_samples(workspace, capsys):
    assert _run(workspace, samples="0") == 2
    assert "--samples must be at least 1" in _error(capsys)


@pytest.mark.parametrize("device", ["bogus", "cuda:9"])
def test_an_unusable_device_is_one_error(workspace, capsys, device):
    if device.startswith("cuda") and torch.cuda.device_count() > 9:
        pytest.skip("this machine has a tenth GPU")
    assert _run(workspace, "--device", device) == 2
    assert f"--device {device!r} is not usable here" in _error(capsys)


def test_tokenizer_model_vocabulary_mismatch(workspace, capsys):
    mismatched = save_tiny_model(str(workspace["root"] / "mismatch"), "llama-tiny", "softmax", tokenizer_words=200)
    assert _run(workspace, models=(mismatched,)) == 2
    message = _error(capsys)
    assert "vocabulary holds 96" in message and "does not belong to this model" in message and "--tokenizer" in message


def test_bad_data_and_options(workspace, capsys):
    assert _run(workspace, data=str(workspace["root"] / "nothing.json.gz")) == 2
    assert "no such file" in _error(capsys)
    assert _run(workspace, "--seq-len", "500") == 2
    assert "exceeds the 64 positions" in _error(capsys)
    assert _run(workspace, "--quant", "w5-sym-tensor") == 2
    assert "valid schemes" in _error(capsys)
    assert _run(workspace, "--map-layer", "9", "--quant", "none") == 2
    assert "map layer 9 does not exist" in _error(capsys)
    assert not os.path.exists(workspace["root"] / "out" / "nothing")


def test_only_w8a8_schemes_give_a_report_without_weight_only_table_or_bits_plot(workspace):
    assert _run(workspace, "--quant", "w8a8-tensor,w8a8-token", models=("gpt2",), out="w8a8") == 0
    out = workspace["root"] / "w8a8"
    markdown = (out / "report.md").read_text()
    _assert_tables_are_rectangular(markdown, minimum=3)  # outliers, W8A8, per layer
    assert "| gpt2-softmax | W8A8 | per-tensor |" in markdown and "| gpt2-softmax | W8A8 | per-token |" in markdown
    assert "### Weight-only" not in markdown
    assert "## Plots" in markdown and "(kurtosis.png)" in markdown
    assert "perplexity_vs_bits" not in markdown and not (out / "perplexity_vs_bits.png").exists()


def test_report_states_the_documents_actually_read(workspace):
    with pytest.warns(UserWarning, match="has only 40 documents"):
        assert _run(workspace, "--quant", "none", models=("gpt2",), samples="100000", out="few") == 0
    report = json.loads((workspace["root"] / "few" / "analysis.json").read_text())
    assert report["settings"]["samples"] == 100000 and report["models"][0]["data"]["documents"] == 40  # write_corpus
    assert "40 documents (asked for 100000)" in (workspace["root"] / "few" / "report.md").read_text()
    assert _run(workspace, "--quant", "none", models=("gpt2",), samples="12", out="enough") == 0
    assert json.loads((workspace["root"] / "enough" / "analysis.json").read_text())["models"][0]["data"][
        "documents"] == 12
    markdown = (workspace["root"] / "enough" / "report.md").read_text()
    assert "12 documents," in markdown and "asked for" not in markdown


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "ds_orthoadam.analysis", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "ds-orthoadam-analyze" in result.stdout, result.stderr


@pytest.mark.parametrize("model, layers_key", [("gpt2", "n_layer"), ("llama", "num_hidden_layers")])
def test_config_with_more_layers_than_the_weights_is_refused(workspace, capsys, model, layers_key):
    """A config.json edited to 4 more layers would otherwise be analysed with random layers, exit 0."""
    edited = _copy_with_config(workspace, model, f"{model}-more-layers", lambda c: c | {layers_key: c[layers_key] + 4})
    assert _run(workspace, models=(edited,), out=f"{model}-more-layers-out") == 2
    message = _error(capsys)
    assert edited in message and "missing tensors: " in message and "randomly initialised" in message


def test_weights_of_another_size_are_refused_in_one_line(workspace, capsys):
    edited = _copy_with_config(workspace, "llama", "llama-narrow", lambda c: c | {"hidden_size": 64})
    assert _run(workspace, models=(edited,), out="narrow-out") == 2
    message = _error(capsys)
    assert "tensors of another shape: " in message and "(96, 128) vs (96, 64)" in message


def _copy_with_config(workspace, model: str, name: str, edit) -> str:
    """A copy of a saved model directory whose config.json is changed by ``edit`` (the weights stay as saved)."""
    import shutil

    target = workspace["root"] / name
    shutil.copytree(workspace[model], target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(edit(config)))
    return str(target)


def test_out_that_is_a_file_is_one_error_line(workspace, capsys):
    (workspace["root"] / "out-file").write_text("x")
    assert _run(workspace, models=("gpt2",), out="out-file") == 2
    assert "error: --out" in _error(capsys) and (workspace["root"] / "out-file").read_text() == "x"


def test_sink_epsilon_is_applied_and_recorded(workspace, capsys):
    """Epsilon 0: every head puts some weight on the first token, so every (sequence, head) is a sink."""
    assert _run(workspace, "--quant", "none", "--sink-epsilon", "0", models=("llama",), out="epsilon") == 0
    report = json.loads((workspace["root"] / "epsilon" / "analysis.json").read_text())
    assert report["settings"]["sink_epsilon"] == 0.0 and "epsilon = 0)" in report["settings"]["definitions"]
    [entry] = report["models"]
    assert entry["metrics"]["sink_rate"] == 1.0 and entry["per_layer"]["sink_rate"] == [1.0] * entry["model"]["layers"]
    for epsilon in ("1", "-0.1"):
        assert _run(workspace, "--sink-epsilon", epsilon, out="bad-epsilon") == 2
        assert f"--sink-epsilon must be in [0, 1) (a share of a row's attention), got {float(epsilon)}" in _error(capsys)
