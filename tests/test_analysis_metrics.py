"""Outlier metrics against independent references: scipy/numpy on captured tensors and constructed attention."""
from __future__ import annotations

import gc
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.stats
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ds_orthoadam.analysis import AnalysisInputError, OutlierStatistics, outlier_metrics
from ds_orthoadam.analysis.hooks import eager_attention, evaluation_mode, stream_layer_outputs
from ds_orthoadam.analysis.metrics import argmax_share_chance, valid_token_mask
from ds_orthoadam.analysis.runner import metric_pass
from ds_orthoadam.models import build_model, set_attention
from tests.analysis_fixtures import SEQ_LEN, expected_first_mass, pattern_model


def _blocks(model):
    """The blocks, found by their known attribute paths (independently of the code under test)."""
    return list(model.transformer.h) if hasattr(model, "transformer") else list(model.model.layers)


def _outlier_model(name: str, attention: str):
    torch.manual_seed(0)
    model = build_model(name, attention=attention, vocab_size=96, max_seq_len=32)
    with torch.no_grad():  # a massive channel, as in trained LLMs, so kurtosis is far from Gaussian
        model.get_input_embeddings().weight[:, 7] *= 300.0
    return model


@pytest.mark.parametrize("name,attention", [("gpt2-tiny", "softmax"), ("llama-tiny", "softmax1")])
def test_hidden_state_metrics_match_scipy_on_captured_tensors(name, attention):
    model = _outlier_model(name, attention)
    batches = [
        (torch.randint(0, 96, (3, SEQ_LEN)), None),
        (torch.randint(0, 96, (2, SEQ_LEN)), torch.tensor([[1] * SEQ_LEN, [1] * 5 + [0] * (SEQ_LEN - 5)])),
    ]
    captured = {layer: [] for layer in range(len(_blocks(model)))}
    handles = [
        block.register_forward_hook(lambda m, a, out, layer=layer: captured[layer].append(out.detach().double()))
        for layer, block in enumerate(_blocks(model))
    ]
    stats = OutlierStatistics(len(captured))
    with evaluation_mode(model), stream_layer_outputs(model, on_hidden=stats.update_hidden):
        for input_ids, mask in batches:
            stats.begin_batch(valid_token_mask(input_ids, mask))
            model(input_ids=input_ids, attention_mask=mask)
    for handle in handles:
        handle.remove()

    per_layer = stats.per_layer()
    for layer, tensors in captured.items():
        first, rest = [], []
        for hidden, (input_ids, mask) in zip(tensors, batches):
            valid = np.ones(input_ids.shape, bool) if mask is None else mask.numpy().astype(bool)
            x = hidden.numpy()
            first.append(x[:, 0][valid[:, 0]])
            rest.append(x[:, 1:][valid[:, 1:]])
        first, rest = np.concatenate(first), np.concatenate(rest)
        kurt_first = scipy.stats.kurtosis(first, axis=-1, fisher=False).mean()
        kurt_rest = scipy.stats.kurtosis(rest, axis=-1, fisher=False).mean()
        assert per_layer["kurtosis_first"][layer] == pytest.approx(kurt_first, rel=1e-4)
        assert per_layer["kurtosis_rest"][layer] == pytest.approx(kurt_rest, rel=1e-4)
        assert per_layer["max_abs_first"][layer] == pytest.approx(np.abs(first).max(-1).mean(), rel=1e-5)
        assert per_layer["max_abs_rest"][layer] == pytest.approx(np.abs(rest).max(-1).mean(), rel=1e-5)
        assert per_layer["peak_abs_rest"][layer] == pytest.approx(np.abs(rest).max(), rel=1e-5)
    assert kurt_rest > 10  # the injected channel really produced outliers

    summary = stats.summary()
    assert summary["kurtosis_rest"] == pytest.approx(np.mean(per_layer["kurtosis_rest"]))
    assert summary["excess_kurtosis_first"] == pytest.approx(summary["kurtosis_first"] - 3.0)


@pytest.mark.parametrize("attention", ["softmax", "softmax1"])
@pytest.mark.parametrize("pattern,share", [("sink", 1.0), ("uniform", 0.0)])
def test_first_token_share_and_mass_on_constructed_attention(pattern, share, attention):
    logit = 6.0
    model = pattern_model(pattern, attention, logit)
    lengths = [SEQ_LEN, SEQ_LEN, 7]
    input_ids = torch.randint(0, 64, (3, SEQ_LEN))
    mask = torch.tensor([[1] * length + [0] * (SEQ_LEN - length) for length in lengths])
    metrics = outlier_metrics(model, input_ids, mask)
    expected_mass = expected_first_mass(pattern, attention, logit, lengths)
    layers = model.config.n_layer
    assert metrics["first_token_share"] == share
    assert metrics["first_token_attention_mass"] == pytest.approx(expected_mass, rel=1e-5)
    for layer in range(layers):
        assert metrics[f"layer_{layer}/first_token_share"] == share
        assert metrics[f"layer_{layer}/first_token_attention_mass"] == pytest.approx(expected_mass, rel=1e-5)


def test_softmax1_lets_a_head_attend_nowhere_where_softmax_cannot():
    """Synthetic no-op head (every logit -6): softmax must spread its mass, softmax-1 can keep it (almost) all."""
    input_ids = torch.randint(0, 64, (2, SEQ_LEN))
    masses = {
        attention: outlier_metrics(pattern_model("negative", attention, 6.0), input_ids)["first_token_attention_mass"]
        for attention in ("softmax", "softmax1")
    }
    assert masses["softmax1"] < 0.02 * masses["softmax"]
    for attention, mass in masses.items():
        assert mass == pytest.approx(expected_first_mass("negative", attention, 6.0, [SEQ_LEN]), rel=1e-5)


@pytest.mark.parametrize("name,attention", [("llama-tiny", "softmax"), ("gpt2-tiny", "softmax1")])
def test_outlier_metrics_restores_attention_and_training_mode(name, attention):
    model = build_model(name, attention=attention, vocab_size=64, max_seq_len=32)
    model.train()
    before = model.config._attn_implementation
    metrics = outlier_metrics(model, torch.randint(0, 64, (2, 8)))
    assert model.training and model.config._attn_implementation == before
    layers = model.config.num_hidden_layers
    for key in ("first_token_share", "kurtosis_first", "kurtosis_rest", "max_abs_first", "max_abs_rest"):
        assert np.isfinite(metrics[key])
        assert metrics[key] == pytest.approx(np.mean([metrics[f"layer_{i}/{key}"] for i in range(layers)]))


def _rope_model(family: str, attention: str):
    """Small Llama / Mistral (grouped-query attention) / Qwen2 models: the analysis must work for any causal LM."""
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                  max_position_embeddings=32)
    if family == "llama":
        return build_model("llama-tiny", attention=attention, vocab_size=64, max_seq_len=32)
    config_class, model_class = {
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[family]
    config = config_class(num_key_value_heads=2, **common)
    set_attention(config, attention)
    return model_class(config)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_uniform_attention_measured_through_rope_in_several_architectures(family):
    """Zero query projections make every logit 0 (RoPE rotates a zero vector to zero): uniform attention."""
    for attention in ("softmax", "softmax1"):
        model = _rope_model(family, attention)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.zero_()
                if layer.self_attn.q_proj.bias is not None:
                    layer.self_attn.q_proj.bias.zero_()
        metrics = outlier_metrics(model, torch.randint(0, 64, (2, SEQ_LEN)))
        assert metrics["first_token_share"] == 0.0
        expected = expected_first_mass("uniform", attention, 0.0, [SEQ_LEN])
        assert metrics["first_token_attention_mass"] == pytest.approx(expected, rel=1e-5)


def test_left_padding_and_out_of_vocabulary_ids_are_rejected():
    model = build_model("llama-tiny", vocab_size=64, max_seq_len=32)
    with pytest.raises(AnalysisInputError, match="left padding"):
        outlier_metrics(model, torch.ones(1, 4, dtype=torch.long), torch.tensor([[0, 1, 1, 1]]))
    with pytest.raises(AnalysisInputError, match="tokenizer does not belong"):
        outlier_metrics(model, torch.full((1, 4), 64))


def test_attention_hook_without_eager_path_explains_the_fix():
    model = build_model("llama-tiny", attention="softmax", vocab_size=64, max_seq_len=32)
    with pytest.raises(AnalysisInputError, match="eager_attention"):
        with evaluation_mode(model), stream_layer_outputs(model, on_attention=lambda layer, probs: None):
            model(torch.ones(1, 4, dtype=torch.long))
    with evaluation_mode(model), eager_attention(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"


def _live_tensor_bytes() -> int:
    gc.collect()
    tensors = [obj for obj in gc.get_objects() if type(obj) in (torch.Tensor, torch.nn.Parameter)]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def test_metric_pass_memory_does_not_grow_with_the_number_of_batches():
    model = build_model("llama-tiny", vocab_size=64, max_seq_len=32)
    batches = [{"input_ids": torch.randint(0, 64, (2, 16))} for _ in range(8)]
    kept = {}
    for count in (1, 8):
        baseline = _live_tensor_bytes()
        kept[count] = metric_pass(model, batches[:count])  # results stay referenced while measuring
        kept[count] = (_live_tensor_bytes() - baseline, kept[count])
    assert kept[8][0] == kept[1][0]
    assert kept[8][0] < 64 * 1024  # per-layer sums and one sample's maps, nothing per batch


@pytest.mark.parametrize("attention", ["softmax", "softmax1"])
def test_sink_rate_on_constructed_attention_counts_sequences_whose_head_mean_exceeds_epsilon(attention):
    """Every head of the constructed model attends alike, so per sequence all heads are sinks or none: the rate is
    the share of sequences whose mean first-token weight (hand formula per length) exceeds epsilon."""
    logit = 0.5  # weak preference: short sequences' head means lie above 0.3, long ones' below
    model = pattern_model("sink", attention, logit)
    lengths = [SEQ_LEN, 5, SEQ_LEN, 4, 1]  # the 1-token sequence has no query and is not counted
    input_ids = torch.randint(0, 64, (len(lengths), SEQ_LEN))
    mask = torch.tensor([[1] * length + [0] * (SEQ_LEN - length) for length in lengths])
    head_means = [expected_first_mass("sink", attention, logit, [length]) for length in lengths if length > 1]
    for epsilon in (0.3, 0.2, 0.0):
        expected = sum(mean > epsilon for mean in head_means) / len(head_means)
        metrics = outlier_metrics(model, input_ids, mask, sink_epsilon=epsilon)
        assert metrics["sink_rate"] == expected
        for layer in range(model.config.n_layer):
            assert metrics[f"layer_{layer}/sink_rate"] == expected
        if epsilon == 0.3:
            assert 0.0 < expected < 1.0  # the threshold separates these sequences: the check is informative
    assert expected == 1.0  # epsilon 0: every head puts some weight on the first token


def _random_causal_attention(batch: int, heads: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Softmax attention over random logits with a random per-(sequence, head) pull towards the first key."""
    logits = torch.randn(batch, heads, seq_len, seq_len, generator=generator)
    logits[..., 0] += 3.0 * torch.rand(batch, heads, 1, generator=generator)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, -math.inf).softmax(dim=-1)


def test_sink_rate_share_mass_and_chance_match_a_loop_reference_on_random_attention():
    generator = torch.Generator().manual_seed(5)
    batch, heads, seq_len, layers, epsilon = 6, 3, 9, 2, 0.3
    lengths = [9, 9, 6, 2, 1, 4]
    valid = torch.tensor([[True] * n + [False] * (seq_len - n) for n in lengths])
    probs = [_random_causal_attention(batch, heads, seq_len, generator) for _ in range(layers)]
    stats = OutlierStatistics(layers, sink_epsilon=epsilon)
    stats.begin_batch(valid)
    for layer, layer_probs in enumerate(probs):
        stats.update_attention(layer, layer_probs)
    per_layer = stats.per_layer()
    rates = []
    for layer, p in enumerate(probs):
        sinks = samples = hits = pairs = 0
        mass = 0.0
        for b, n in enumerate(lengths):
            for h in range(heads):
                rows = [p[b, h, q, : q + 1].tolist() for q in range(1, n)]
                hits += sum(row[0] > max(row[1:]) for row in rows)
                pairs += len(rows)
                mass += sum(row[0] for row in rows)
                if rows:
                    samples += 1
                    sinks += sum(row[0] for row in rows) / len(rows) > epsilon
        rates.append(sinks / samples)
        assert per_layer["sink_rate"][layer] == rates[-1]
        assert per_layer["first_token_share"][layer] == pytest.approx(hits / pairs)
        assert per_layer["first_token_attention_mass"][layer] == pytest.approx(mass / pairs, rel=1e-6)
    assert 0.0 < min(rates) and max(rates) < 1.0
    summary = stats.summary()
    assert summary["sink_rate"] == pytest.approx(np.mean(rates))
    chance = [1.0 / (q + 1) for n in lengths for q in range(1, n)]
    assert summary["first_token_share_chance"] == pytest.approx(np.mean(chance))


@pytest.mark.parametrize("seq_len", [2, 3, 4, 5])
def test_argmax_share_chance_equals_the_share_over_every_ordering_of_the_weights(seq_len):
    """Brute force through the metric itself: one sequence per joint ordering of every query row's weights (distinct
    weights, so no ties); the share over all of them is exactly the chance level (H_T - 1) / (T - 1)."""
    rows_per_query = [list(itertools.permutations(range(1, q + 2))) for q in range(seq_len)]
    sequences = list(itertools.product(*rows_per_query))
    probs = torch.zeros(len(sequences), 1, seq_len, seq_len, dtype=torch.float64)
    for index, sequence in enumerate(sequences):
        for q, ranks in enumerate(sequence):
            weights = torch.tensor(ranks, dtype=torch.float64)
            probs[index, 0, q, : q + 1] = weights / weights.sum()
    stats = OutlierStatistics(1)
    stats.begin_batch(torch.ones(len(sequences), seq_len, dtype=torch.bool))
    stats.update_attention(0, probs)
    summary = stats.summary()
    harmonic = sum(Fraction(1, k) for k in range(1, seq_len + 1))
    exact = float((harmonic - 1) / (seq_len - 1))
    assert summary["first_token_share"] == pytest.approx(exact, rel=1e-12)
    assert argmax_share_chance(seq_len) == pytest.approx(exact, rel=1e-12)
    assert summary["first_token_share_chance"] == pytest.approx(exact, rel=1e-12)


def test_uniform_attention_has_share_zero_and_mass_at_the_chance_level():
    """Ties are not a largest weight: exactly uniform rows score 0, while their first-token mass is the chance level."""
    seq_len = 7
    uniform = torch.ones(seq_len, seq_len).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(2, 3, seq_len, seq_len)
    stats = OutlierStatistics(1)
    stats.begin_batch(torch.ones(2, seq_len, dtype=torch.bool))
    stats.update_attention(0, uniform)
    summary = stats.summary()
    assert summary["first_token_share"] == 0.0
    assert summary["first_token_attention_mass"] == pytest.approx(argmax_share_chance(seq_len), rel=1e-6)
    assert argmax_share_chance(128) == pytest.approx(0.0349, abs=5e-5)  # the "about 4%" of PAPER.md at T = 128
    assert argmax_share_chance(256) == pytest.approx(0.0201, abs=5e-5)  # "about 2%" at T = 256
    assert math.isnan(argmax_share_chance(1))
