"""RTN and W8A8 quantisers: exact values on hand-made tensors, error bounds, idempotence, grid sizes in models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from ds_orthoadam.analysis import AnalysisInputError, perplexity
from ds_orthoadam.analysis.quantize import (
    QuantScheme,
    WeightQuantizer,
    default_schemes,
    quantizable_layers,
    quantize_activations,
    quantized,
    scheme_by_name,
)
from ds_orthoadam.data import resolve_source, validation_batches
from ds_orthoadam.models import build_model
from tests.analysis_fixtures import word_tokenizer, write_corpus

ALL_WEIGHT_QUANTIZERS = [
    WeightQuantizer(bits, symmetric, granularity, group_size=16)
    for bits in (8, 4)
    for symmetric in (True, False)
    for granularity in ("tensor", "channel", "group")
]


def test_symmetric_absmax_exact_values():
    weight = torch.tensor([[-7.0, 2.4], [0.6, 3.4]])  # absmax 7 at 4 bits: levels +-7, scale exactly 1
    expected = torch.tensor([[-7.0, 2.0], [1.0, 3.0]])
    assert torch.equal(WeightQuantizer(4, True, "tensor")(weight), expected)
    # Per channel: row 1 has absmax 3.4, scale 3.4 / 7; 0.6 / scale = 1.235 -> 1.
    per_channel = WeightQuantizer(4, True, "channel")(weight)
    assert torch.allclose(per_channel, torch.tensor([[-7.0, 2.0], [3.4 / 7, 3.4]]))


def test_asymmetric_minmax_exact_values():
    weight = torch.tensor([[-2.0, -1.2, 4.0, 13.0], [0.0, 1.4, 3.0, 15.0]])  # both rows span 15: scale 1
    expected = torch.tensor([[-2.0, -1.0, 4.0, 13.0], [0.0, 1.0, 3.0, 15.0]])
    assert torch.allclose(WeightQuantizer(4, False, "channel")(weight), expected)
    # A constant row cannot be scaled; it is exactly representable and kept.
    constant = torch.full((1, 4), 0.3)
    assert torch.equal(WeightQuantizer(4, False, "channel")(constant), constant)


def test_groups_have_their_own_scale_including_a_ragged_last_group():
    weight = torch.tensor([[0.4, -7.0, 3.0, 1.2, 14.0, 0.6]])  # groups of 4: absmax 7 (scale 1), 14 (scale 2)
    expected = torch.tensor([[0.0, -7.0, 3.0, 1.0, 14.0, 0.0]])
    assert torch.equal(WeightQuantizer(4, True, "group", group_size=4)(weight), expected)


@pytest.mark.parametrize("quantizer", ALL_WEIGHT_QUANTIZERS, ids=lambda q: f"w{q.bits}-{q.label}")
def test_round_trip_error_bound_and_idempotence(quantizer):
    torch.manual_seed(0)
    weight = torch.randn(24, 40) * torch.logspace(-2, 1, 40)  # very different scales per column
    result = quantizer(weight)
    size = {"tensor": weight.numel(), "channel": 40, "group": 16}[quantizer.granularity]
    # Independent bound from numpy: each element is within half a step of its group's grid.
    array = weight.numpy()
    for row in range(24):
        for start in range(0, 40, size if quantizer.granularity != "tensor" else 40):
            rows = slice(None) if quantizer.granularity == "tensor" else slice(row, row + 1)
            cols = slice(None) if quantizer.granularity != "group" else slice(start, start + size)
            group = array[rows, cols]
            if quantizer.symmetric:
                step = np.abs(group).max() / (2 ** (quantizer.bits - 1) - 1)
            else:
                step = (group.max() - group.min()) / (2**quantizer.bits - 1)
            error = np.abs(result.numpy()[rows, cols] - group)
            assert error.max() <= step / 2 * (1 + 1e-5) + 1e-7
    assert torch.allclose(quantizer(result), result, rtol=0, atol=1e-6 * weight.abs().max())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_eight_bits_are_more_accurate_than_four(symmetric, granularity):
    torch.manual_seed(1)
    weight = torch.randn(64, 300)
    errors = {
        bits: (WeightQuantizer(bits, symmetric, granularity)(weight) - weight).square().mean() for bits in (8, 4)
    }
    assert errors[8] < errors[4] / 100  # each extra bit halves the step: 16x the step, ~256x the squared error


def test_half_precision_weights_stay_half_precision():
    weight = torch.randn(8, 16, dtype=torch.float16)
    result = WeightQuantizer(4, True, "channel")(weight)
    assert result.dtype == torch.float16
    assert (result.float() - weight.float()).abs().max() <= weight.float().abs().max() / 7


def _distinct_per_group(matrix: torch.Tensor, quantizer: WeightQuantizer) -> torch.Tensor:
    """Number of distinct values in every quantisation group of an [out, in] matrix (counted by sorting)."""
    if quantizer.granularity == "tensor":
        chunks = [matrix.reshape(1, -1)]
    elif quantizer.granularity == "channel":
        chunks = [matrix]
    else:
        chunks = list(torch.split(matrix, quantizer.group_size, dim=1))
    counts = [(chunk.sort(dim=1).values.diff(dim=1) != 0).sum(dim=1) + 1 for chunk in chunks]
    return torch.cat(counts)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_quantised_model_weights_lie_on_at_most_2_to_the_bits_values_per_group(name):
    model = build_model(name, vocab_size=64, max_seq_len=32)
    originals = {key: value.clone() for key, value in model.state_dict().items()}
    head = model.get_output_embeddings()
    layers = quantizable_layers(model)
    expected_count = 4 * 4 + 3 * 4 if name == "llama-tiny" else 4 * 6  # q,k,v,o + 3 MLP / c_attn,c_proj,c_fc,c_proj
    assert len(layers) == expected_count and head not in layers.values()
    for quantizer in ALL_WEIGHT_QUANTIZERS:
        group_quantizer = WeightQuantizer(quantizer.bits, quantizer.symmetric, quantizer.granularity, group_size=96)
        with quantized(model, QuantScheme(group_quantizer)):
            for module in layers.values():
                matrix = module.weight.detach().t() if isinstance(module, Conv1D) else module.weight.detach()
                assert _distinct_per_group(matrix, group_quantizer).max() <= 2**group_quantizer.bits
            assert torch.equal(model.get_input_embeddings().weight, originals[_embedding_key(model)])
        for key, value in model.state_dict().items():
            assert torch.equal(value, originals[key]), f"{key} not restored"


def _embedding_key(model) -> str:
    return "transformer.wte.weight" if hasattr(model, "transformer") else "model.embed_tokens.weight"


def _numpy_absmax(values: np.ndarray, axis) -> np.ndarray:
    scale = np.abs(values).max(axis=axis, keepdims=True) / 127
    return np.clip(np.round(values / scale), -127, 127) * scale


def test_activation_quantisation_per_tensor_and_per_token():
    torch.manual_seed(2)
    x = torch.randn(2, 5, 8) * torch.tensor([1.0, 50.0, 0.1, 3.0, 7.0])[None, :, None]
    per_token = quantize_activations(x, 8, "token").numpy()
    per_tensor = quantize_activations(x, 8, "tensor").numpy()
    assert np.allclose(per_token, _numpy_absmax(x.numpy().astype(np.float64), axis=-1), atol=1e-5)
    assert np.allclose(per_tensor, _numpy_absmax(x.numpy().astype(np.float64), axis=None), atol=1e-5)
    # Per token keeps small tokens; per tensor flushes the 0.1-scale token to very few levels.
    assert np.unique(per_tensor[:, 2]).size < np.unique(per_token[:, 2]).size
    # With a mask of real tokens, the per-tensor scale comes from those only (the 50-scale token is padding here).
    valid = torch.tensor([[True, False, True, True, True], [True, True, True, False, False]])
    real_absmax = np.abs(x.numpy()[valid.numpy()]).max()
    scale = real_absmax / 127
    expected = np.clip(np.round(x.numpy() / scale), -127, 127) * scale
    assert np.allclose(quantize_activations(x, 8, "tensor", valid).numpy(), expected, atol=1e-5)
    assert torch.equal(quantize_activations(x, 8, "token", valid), quantize_activations(x, 8, "token"))
    with pytest.raises(AnalysisInputError, match="attention_mask"):
        quantize_activations(x, 8, "tensor", valid[:, :4])


def _real_token_w8a8_tensor_hook(valid: torch.Tensor):
    """Reference W8A8 per-tensor input quantisation written out here: absmax over each sequence's real tokens only."""
    def hook(module, args):
        rows = []
        for values, real in zip(args[0].double(), valid):
            scale = values[real].abs().max() / 127
            rows.append(torch.clamp(torch.round(values / scale), -127, 127) * scale)
        return (torch.stack(rows).to(args[0].dtype),)

    return hook


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_w8a8_per_tensor_perplexity_ignores_padding(name):
    torch.manual_seed(3)
    model = build_model(name, vocab_size=64, max_seq_len=32).eval()
    embedding = model.get_input_embeddings()
    model.get_output_embeddings().weight = torch.nn.Parameter(embedding.weight.detach().clone())  # untie GPT2's
    with torch.no_grad():  # a pad id with a huge embedding: a scale taken over padding would swamp the real tokens
        embedding.weight[63] *= 1000
    ids = torch.randint(1, 60, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 5:] = mask[2, 8:] = 0
    results = []
    for pad_id in (0, 63):
        batch = {"input_ids": ids.masked_fill(mask == 0, pad_id), "attention_mask": mask}
        with quantized(model, scheme_by_name("w8a8-tensor")):
            results.append(perplexity(model, [batch]))
    with quantized(model, scheme_by_name("w8-sym-channel")) as layers:  # the weights of W8A8
        handles = [layer.register_forward_pre_hook(_real_token_w8a8_tensor_hook(mask.bool()))
                   for layer in layers.values()]
        reference = perplexity(model, [{"input_ids": ids, "attention_mask": mask}])
        for handle in handles:
            handle.remove()
    assert results[0] == pytest.approx(reference, rel=1e-5) and results[1] == pytest.approx(reference, rel=1e-5)


def test_w8a8_quantises_the_inputs_of_every_quantised_layer():
    model = build_model("llama-tiny", vocab_size=64, max_seq_len=32).eval()
    seen = {}
    layer_name, layer = next(iter(quantizable_layers(model).items()))
    with quantized(model, scheme_by_name("w8a8-token")):
        handle = layer.register_forward_pre_hook(lambda module, args: seen.setdefault("input", args[0].detach()))
        model(torch.randint(0, 64, (1, 6)))
        handle.remove()
    tokens = seen["input"].reshape(-1, seen["input"].shape[-1]).double().numpy()
    for token in tokens:  # on a 255-level grid scaled by the token's absmax
        steps = token / (np.abs(token).max() / 127)
        assert np.allclose(steps, np.round(steps), atol=1e-3)
    assert layer_name and layer._forward_pre_hooks == {}


def test_scheme_names_and_bad_schemes():
    names = [scheme.name for scheme in default_schemes()]
    assert len(names) == 14 and len(set(names)) == 14
    assert "w4-asym-group128" in names and "w8a8-tensor" in names
    with pytest.raises(AnalysisInputError, match="valid schemes"):
        scheme_by_name("w3-sym-tensor")
    with pytest.raises(AnalysisInputError, match="granularity"):
        WeightQuantizer(4, True, "row")


def test_per_sequence_activation_scales_equal_quantising_each_sequence_alone():
    torch.manual_seed(4)
    x = torch.randn(3, 5, 8) * torch.tensor([1.0, 40.0, 0.2])[:, None, None]  # sequence 1 holds the outlier
    valid = torch.tensor([[True] * 5, [True, True, False, False, False], [True] * 4 + [False]])
    batched = quantize_activations(x, 8, "tensor", valid, per_sequence=True)
    for row in range(3):
        alone = quantize_activations(x[row:row + 1], 8, "tensor", valid[row:row + 1])
        assert torch.equal(batched[row:row + 1], alone)
    expected = _numpy_absmax(x[2:3, :4].numpy().astype(np.float64), axis=None)  # real tokens of sequence 2 only
    assert np.allclose(batched[2, :4].numpy(), expected[0], atol=1e-6)
    # One scale for the call would put sequence 0 on the outlier's coarse grid.
    assert not torch.equal(quantize_activations(x, 8, "tensor", valid)[0], batched[0])


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_w8a8_per_tensor_perplexity_does_not_depend_on_the_batch_size(tmp_path, mode):
    """The analyser's data path at --batch-size 1 and 8, one word given an outlier embedding (as a massive activation
    would be): per-sequence scales give the same quantised perplexity; one scale per batch would not."""
    corpus = write_corpus(str(tmp_path))
    tokenizer = word_tokenizer()
    torch.manual_seed(6)
    model = build_model("llama-tiny", vocab_size=len(tokenizer), max_seq_len=64).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("garden")] *= 300.0
        model.lm_head.weight.mul_(10.0)  # sharper predictions, so that activation noise shows in the perplexity
    batches = {size: list(validation_batches(resolve_source(corpus["txt"], "validation"), tokenizer, 24, size, 16,
                                             mode=mode)) for size in (1, 8)}
    sizes = [b["input_ids"].shape[0] for b in batches[8]]
    assert sizes[0] == 8 and sum(sizes) == len(batches[1])  # the same sequences, batched
    ppl = {}
    for size, data in batches.items():
        with quantized(model, scheme_by_name("w8a8-tensor")):
            ppl[size] = perplexity(model, data)
    assert ppl[1] == pytest.approx(ppl[8], rel=1e-4)
    with quantized(model, scheme_by_name("w8-sym-channel")) as layers:  # the same weights, one scale per batch
        hook = lambda module, args: (quantize_activations(args[0], 8, "tensor"),) + args[1:]  # noqa: E731
        handles = [layer.register_forward_pre_hook(hook) for layer in layers.values()]
        per_batch = perplexity(model, batches[8]) if mode == "pack" else None
        for handle in handles:
            handle.remove()
    if per_batch is not None:  # (pack: no padding, so one scale per call is well defined)
        assert abs(per_batch - ppl[1]) > 1e-3 * ppl[1]  # the outlier would have coarsened the others' grid
