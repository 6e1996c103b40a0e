"""The report: a diverged model (huge or NaN loss) still gets its report and plots, older analysis.json files (without
the sink rate) still render, the paper-comparable quantisation row is marked, the chance level is printed."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ds_orthoadam.analysis import analyze_model
from ds_orthoadam.analysis.metrics import argmax_share_chance
from ds_orthoadam.analysis.perplexity import NLLAccumulator
from ds_orthoadam.analysis.plots import write_plots
from ds_orthoadam.analysis.quantize import PAPER_COMPARABLE_SCHEME, scheme_by_name
from ds_orthoadam.analysis.report import markdown_report, report_settings, write_report
from ds_orthoadam.models import build_model

SEQ_LEN = 10
SCHEMES = [scheme_by_name(name) for name in ("w8-sym-tensor", PAPER_COMPARABLE_SCHEME, "w4-sym-channel",
                                             "w8a8-tensor")]


def _model(kind: str):
    torch.manual_seed(0)
    model = build_model("llama-tiny", vocab_size=64, max_seq_len=32, num_hidden_layers=2)
    with torch.no_grad():
        if kind == "huge-loss":  # confident, wrong logits: mean NLL in the thousands, exp would overflow
            model.lm_head.weight.mul_(1e4)
        elif kind == "nan":
            model.model.layers[0].self_attn.q_proj.weight[0, 0] = math.nan
    return model


def _batches():
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(2, SEQ_LEN, dtype=torch.long)
    mask[1, 6:] = 0
    return [{"input_ids": torch.randint(0, 64, (2, SEQ_LEN), generator=generator), "attention_mask": mask}
            for _ in range(2)]


def _report(models: dict) -> tuple[dict, list]:
    entries, maps = [], []
    for label, model in models.items():
        analysis = analyze_model(model, _batches(), SCHEMES)
        analysis.record["data"]["documents"] = 4  # set by the CLI from the data source
        entries.append({"label": label, "path": label} | analysis.record)
        maps.append(analysis.maps)
    settings = report_settings("data", 4, SEQ_LEN, 2, "pad", SCHEMES, sink_epsilon=0.3)
    return {"settings": settings, "models": entries}, maps


def test_nll_accumulator_perplexity_overflows_to_infinity():
    accumulator = NLLAccumulator()
    accumulator.total_nll, accumulator.tokens = 2000.0, 2
    assert accumulator.perplexity == math.inf
    accumulator.total_nll = math.nan
    assert math.isnan(accumulator.perplexity)
    accumulator.total_nll = 6.0
    assert accumulator.perplexity == pytest.approx(math.exp(3.0))


def test_a_diverged_model_gets_a_report_and_plots(tmp_path):
    report, maps = _report({"healthy": _model("healthy"), "huge-loss": _model("huge-loss"), "nan": _model("nan")})
    healthy, huge, nan = report["models"]
    assert math.isfinite(healthy["perplexity"])
    assert huge["perplexity"] == math.inf
    assert math.isnan(nan["perplexity"])
    plots = write_plots(str(tmp_path), report["models"], maps, SEQ_LEN)
    json_path, markdown_path = write_report(str(tmp_path), report, plots)
    assert all((tmp_path / plot).stat().st_size > 0 for plot in plots)
    saved = json.loads(open(json_path, encoding="utf-8").read())  # strict JSON: non-finite numbers are null
    assert [entry["perplexity"] for entry in saved["models"][1:]] == [None, None]
    markdown = open(markdown_path, encoding="utf-8").read()
    huge_row = next(line for line in markdown.splitlines() if line.startswith("| huge-loss | sym-tensor |"))
    assert "| inf |" in huge_row and "n/a" in huge_row  # quantised ppl inf, penalty inf - inf
    # The report also renders from the file, where every non-finite number has become null.
    assert "| nan |" in markdown_report(saved, plots) and "| huge-loss |" in markdown_report(saved, plots)


def test_report_marks_the_paper_comparable_row_prints_the_chance_level_and_reads_older_files(tmp_path):
    report, _ = _report({"model": _model("healthy")})
    [entry] = report["models"]
    results = {r["scheme"]: r for r in entry["quantization"]}
    assert [name for name, r in results.items() if r["paper_comparable"]] == [PAPER_COMPARABLE_SCHEME]
    assert report["settings"]["paper_comparable_scheme"] == PAPER_COMPARABLE_SCHEME
    markdown = markdown_report(report, [])
    paper_penalty = f"**{results[PAPER_COMPARABLE_SCHEME]['penalty']:+.2f}**"
    [row] = [line for line in markdown.splitlines() if paper_penalty in line]
    assert row.startswith("| model | sym-tensor |") and markdown.count("**+") + markdown.count("**-") == 1
    assert f"`{PAPER_COMPARABLE_SCHEME}`, the penalty comparable with the paper's 4-bit RTN penalty" in markdown
    assert f"sequence length {SEQ_LEN}: {100 * argmax_share_chance(SEQ_LEN):.2f}%" in markdown
    measured = entry["metrics"]["first_token_share_chance"]  # the padded second sequences lower the mean
    assert measured > argmax_share_chance(SEQ_LEN) and f"model {100 * measured:.2f}%" in markdown
    assert "softmax-1 is softmax scaled per row by sigmoid(L), so its argmax" in markdown
    assert f"| {100 * entry['metrics']['sink_rate']:.1f}% |" in markdown

    older = json.loads(json.dumps(report))  # an analysis.json written before the sink rate existed
    for key in ("sink_rate", "first_token_share_chance"):
        del older["models"][0]["metrics"][key]
    del older["models"][0]["per_layer"]["sink_rate"]
    for key in ("sink_epsilon", "paper_comparable_scheme", "first_token_share_chance", "definitions"):
        del older["settings"][key]
    rendered = markdown_report(older, [])
    assert "| model | " in rendered and "n/a" in rendered
