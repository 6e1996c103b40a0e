"""Model zoo: parameter counts, options, errors and save/reload round trips."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM

import ds_orthoadam  # noqa: F401
from ds_orthoadam.models import (
    MODEL_SPECS,
    ModelConfigError,
    SingleScaleRMSNorm,
    build_model,
    meta_parameter_count,
    set_attention,
)


def closed_form_parameter_count(name: str) -> int:
    """Parameter count from the architecture formula (independent of transformers' module tree)."""
    s = MODEL_SPECS[name]
    d, layers, vocab = s.hidden, s.layers, s.vocab_size
    if s.family == "llama":  # untied embeddings and head, q/k/v/o without bias, SwiGLU MLP, two RMSNorms per block
        return 2 * vocab * d + layers * (4 * d * d + 3 * d * s.intermediate + 2 * d) + d
    # GPT2: tied embeddings, learned positions (256), biased projections, two LayerNorms per block
    return vocab * d + 256 * d + layers * (4 * d * d + 4 * d + 2 * d * s.intermediate + s.intermediate + d + 4 * d) + 2 * d


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_parameter_count_matches_formula_and_documented_figure(name):
    counted = meta_parameter_count(name)
    assert counted == closed_form_parameter_count(name)
    assert abs(counted / MODEL_SPECS[name].params - 1) <= 0.03


@pytest.mark.parametrize("size", ["60m", "130m", "350m", "1.4b", "3b", "7b"])
def test_gpt2_sizes_match_their_llama_siblings_within_3_percent(size):
    assert abs(MODEL_SPECS[f"gpt2-{size}"].params / MODEL_SPECS[f"llama-{size}"].params - 1) <= 0.03


def test_tiny_models_are_in_the_cpu_range():
    for name in ("gpt2-tiny", "llama-tiny"):
        assert 1_000_000 <= meta_parameter_count(name) <= 3_000_000


def test_classes_attention_and_vocabulary_options():
    gpt2 = build_model("gpt2-tiny", attention="softmax", vocab_size=1000)
    llama = build_model("llama-tiny", attention="softmax1", max_seq_len=512)
    assert isinstance(gpt2, GPT2LMHeadModel) and isinstance(llama, LlamaForCausalLM)
    assert gpt2.config._attn_implementation == "sdpa" and gpt2.config.vocab_size == 1000
    assert llama.config._attn_implementation == "softmax1" and llama.config.max_position_embeddings == 512


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(name="llama-70b"), "llama-60m"),
        (dict(name="gpt2-tiny", attention="softmax2"), "softmax1"),
        (dict(name="gpt2-tiny", norm="layernorm"), "single_scale_rmsnorm"),
        (dict(name="gpt2-tiny", n_embdd=3), "n_embdd"),
    ],
)
def test_unknown_names_list_the_valid_choices(kwargs, needle):
    with pytest.raises(ModelConfigError, match=needle):
        build_model(**kwargs)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_single_scale_rmsnorm_replaces_every_norm(name):
    model = build_model(name, norm="single_scale_rmsnorm")
    norms = [m for m in model.modules() if isinstance(m, SingleScaleRMSNorm)]
    assert len(norms) == 2 * model.config.num_hidden_layers + 1
    assert all(m.weight.shape == (1,) for m in norms)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())


def test_single_scale_rmsnorm_formula():
    norm = SingleScaleRMSNorm(6, eps=0.0)
    with torch.no_grad():
        norm.weight.fill_(2.0)
    x = torch.tensor([[3.0, -3.0, 3.0, -3.0, 3.0, -3.0]])
    torch.testing.assert_close(norm(x), 2.0 * x / 3.0)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("norm", ["default", "single_scale_rmsnorm"])
def test_saved_softmax1_model_reloads_with_softmax1_and_identical_logits(tmp_path, name, norm):
    torch.manual_seed(0)
    model = build_model(name, attention="softmax1", norm=norm).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attn_implementation"] == "softmax1"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert reloaded.config._attn_implementation == "softmax1"
    ids = torch.randint(3, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("switch_to", ["softmax1", "softmax"])
def test_set_attention_switches_the_running_model_and_what_a_save_records(tmp_path, switch_to):
    """Reference for the switched model: one built with that attention from the start (same seed, same weights)."""
    start = "softmax" if switch_to == "softmax1" else "softmax1"
    torch.manual_seed(0)
    model = build_model("llama-tiny", attention=start).eval()
    torch.manual_seed(0)
    reference = build_model("llama-tiny", attention=switch_to).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    set_attention(model.config, switch_to)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)


def test_llama_7b_has_llama_2_7b_published_parameter_count():
    """Llama-2-7B (hidden 4096, MLP 11008, 32 layers, vocabulary 32000, untied head) has 6,738,415,616 parameters as
    published with its weights; our meta-built llama-7b must be that architecture exactly."""
    assert meta_parameter_count("llama-7b") == 6_738_415_616
