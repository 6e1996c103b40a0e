"""softmax-1 against independent float64 references, and inside real GPT2/Llama models."""
import math

import pytest
import torch
from torch import nn

import ds_orthoadam  # noqa: F401  (registers softmax1)
from ds_orthoadam.attention import softmax1, softmax1_attention, softmax1_eager_attention, softmax1_sdpa_attention
from ds_orthoadam.models import build_model


def reference_softmax1(x: torch.Tensor) -> torch.Tensor:
    """softmax-1 in float64 through the log domain: exp(x_i - log(1 + sum_j exp(x_j)))."""
    x = x.double()
    log_denominator = torch.logaddexp(torch.zeros((), dtype=torch.float64), torch.logsumexp(x, dim=-1, keepdim=True))
    return torch.exp(x - log_denominator)


ADVERSARIAL = {
    "large_positive": torch.tensor([[1e4, 1e4 - 1.0, 0.0, -5.0]]),
    "large_negative": torch.tensor([[-1e4, -1e4 + 3.0, -2e4]]),
    "mixed_extremes": torch.tensor([[1e4, -1e4, 0.0]]),
    "all_masked": torch.full((2, 5), float("-inf")),
    "partly_masked": torch.tensor([[float("-inf"), 0.5, float("-inf"), -0.5]]),
    "length_one": torch.tensor([[3.0], [-3.0], [0.0]]),
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_softmax1_adversarial_inputs_match_float64_reference(case):
    x = ADVERSARIAL[case]
    result = softmax1(x)
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result.double(), reference_softmax1(x), rtol=1e-6, atol=1e-12)


def test_softmax1_fully_masked_rows_are_zero_and_length_one_is_sigmoid():
    assert softmax1(ADVERSARIAL["all_masked"]).abs().max() == 0
    x = ADVERSARIAL["length_one"]
    torch.testing.assert_close(softmax1(x), torch.sigmoid(x))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_softmax1_random_inputs_all_dtypes(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 7, 33, generator=gen) * 6).to(dtype)
    result = softmax1(x)
    assert result.dtype == dtype
    torch.testing.assert_close(result.double(), reference_softmax1(x), rtol=tol, atol=tol)
    # Rows sum to strictly less than one: the missing mass went "nowhere".
    assert (reference_softmax1(x).sum(-1) < 1).all()
    assert (result.float().sum(-1) <= 1 + tol).all()


def test_softmax1_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(softmax1, (x,))
    masked = x.detach().clone()
    masked[0, :2] = float("-inf")
    masked.requires_grad_(True)
    assert torch.autograd.gradcheck(softmax1, (masked,))


class _FakeAttentionModule(nn.Module):
    num_key_value_groups = 2


def _reference_attention(q, k, v, mask, scale):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = reference_softmax1(scores)
    return (probs @ v.double()).transpose(1, 2), probs


@pytest.mark.parametrize("implementation", [softmax1_eager_attention, softmax1_sdpa_attention])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("padded", [True, False])
def test_attention_functions_match_reference_with_causal_padding_mask_and_gqa(implementation, dtype, tol, padded):
    """padded=False passes no mask, as transformers does for a purely causal batch: causality must still hold."""
    gen = torch.Generator().manual_seed(2)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 9, 8
    q = torch.randn(batch, heads, length, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen).to(dtype) * 3
    v = torch.randn(batch, kv_heads, length, dim, generator=gen).to(dtype)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = causal.expand(batch, 1, length, length).clone()
    if padded:
        mask[1, :, :, :3] = False  # left padding of three tokens in the second row: its first rows are fully masked
    module = _FakeAttentionModule().eval()
    out, weights = implementation(module, q, k, v, mask if padded else None, scaling=dim**-0.5)
    expected_out, expected_probs = _reference_attention(q, k, v, mask, dim**-0.5)
    assert out.shape == (batch, length, heads, dim)
    torch.testing.assert_close(out.double(), expected_out, rtol=tol, atol=tol)
    if weights is not None:
        torch.testing.assert_close(weights.double(), expected_probs, rtol=tol, atol=tol)
    if padded:
        assert out[1, :3].abs().max() == 0  # fully masked queries attend nowhere


def _tokens(vocab: int, batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


FAMILIES = ["gpt2-tiny", "llama-tiny"]


def _model(name: str, implementation: str = "softmax1") -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, attention="softmax1").eval()
    model.set_attn_implementation(implementation)
    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_model_logits_and_gradients_match_eager_reference(name):
    fused, eager = _model(name, "softmax1"), _model(name, "softmax1_eager")
    ids = _tokens(fused.config.vocab_size)
    out_fused = fused(ids, labels=ids)
    out_eager = eager(ids, labels=ids)
    torch.testing.assert_close(out_fused.logits, out_eager.logits, rtol=1e-4, atol=1e-4)
    out_fused.loss.backward()
    out_eager.loss.backward()
    for (param_name, a), (_, b) in zip(fused.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=param_name)


@pytest.mark.parametrize("name", FAMILIES)
def test_softmax1_differs_from_softmax_on_the_same_weights(name):
    """Negative control: the registered function really is softmax-1, not a silent fallback to softmax."""
    model = _model(name)
    ids = _tokens(model.config.vocab_size)
    with torch.no_grad():
        softmax1_logits = model(ids).logits
        model.set_attn_implementation("sdpa")
        softmax_logits = model(ids).logits
    assert (softmax1_logits - softmax_logits).abs().max() > 1e-3


@pytest.mark.parametrize("implementation", ["softmax1", "softmax1_eager"])
@pytest.mark.parametrize("name", FAMILIES)
def test_causality_future_tokens_do_not_change_past_logits(name, implementation):
    model = _model(name, implementation)
    ids = _tokens(model.config.vocab_size, batch=1)
    changed = ids.clone()
    changed[0, 15:] = (changed[0, 15:] + 7) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=1e-5, atol=1e-5)
    assert (a[:, 15:] - b[:, 15:]).abs().max() > 1e-3


@pytest.mark.parametrize("implementation", ["softmax1", "softmax1_eager"])
@pytest.mark.parametrize("name", FAMILIES)
def test_left_padded_batch_equals_unpadded_rows(name, implementation):
    model = _model(name, implementation)
    long_row, short_row = _tokens(model.config.vocab_size, batch=2, length=20, seed=3)
    short_row = short_row[:14]
    pad = 6
    ids = torch.stack([long_row, torch.cat([torch.zeros(pad, dtype=torch.long), short_row])])
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :pad] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(ids, attention_mask=attention_mask, position_ids=position_ids).logits
        alone_long = model(long_row[None]).logits
        alone_short = model(short_row[None]).logits
    torch.testing.assert_close(batched[0], alone_long[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[1, pad:], alone_short[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
@pytest.mark.parametrize("implementation", ["softmax1", "softmax1_sdpa", "softmax1_eager"])
def test_static_cache_generation_equals_generation_without_a_cache(name, implementation):
    """A static cache's first forward gets no mask while its keys are the whole cache, slots not written yet
    included (transformers then means SDPA's upper-left causality); those slots must stay invisible. Reference: the
    logits of a forward without cache, and greedy decoding by full forwards over the growing sequence."""
    from transformers import StaticCache

    torch.manual_seed(0)
    model = build_model(name, attention="softmax1").eval()
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.mul_(8)  # sharper logits: greedy choices are decisive
    ids = torch.randint(3, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cached = model(ids, past_key_values=StaticCache(config=model.config, max_cache_len=32), use_cache=True)
        torch.testing.assert_close(cached.logits, model(ids, use_cache=False).logits, rtol=0, atol=1e-4)
        expected = ids
        for _ in range(6):
            following = model(expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, following], dim=1)
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                   pad_token_id=0, cache_implementation="static")
    assert generated.tolist() == expected.tolist()


@pytest.mark.parametrize("output_attentions", [False, True])
def test_float16_logits_that_fit_give_the_same_finite_output_with_or_without_weights(output_attentions):
    """q.k = 102400 overflows float16, the scaled logit 12800 does not. All logits are equal, so softmax-1 gives
    query i the mean of values 0..i (exp(-12800) vanishes); both paths of softmax1 must return it."""
    class Attention(nn.Module):
        num_key_value_groups, is_causal = 1, True

    length, head_dim = 4, 64
    query = torch.full((1, 1, length, head_dim), 40.0, dtype=torch.float16)
    value = torch.randn(1, 1, length, head_dim, generator=torch.Generator().manual_seed(0)).half()
    expected = torch.stack([value[0, 0, :i + 1].double().mean(0) for i in range(length)])
    output, _ = softmax1_attention(Attention().eval(), query, query.clone(), value, None, scaling=head_dim**-0.5,
                                   output_attentions=output_attentions)
    torch.testing.assert_close(output[0, :, 0].double(), expected, rtol=0, atol=2e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_output_attentions_returns_softmax1_weights(name):
    """Both transformers routes (flag passed through for Llama, output collector for GPT2) reach the eager path."""
    model = _model(name)
    ids = _tokens(model.config.vocab_size, batch=1, length=12)
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    for weights in out.attentions:
        assert weights is not None and weights.shape[-2:] == (12, 12)
        assert (weights.sum(-1) < 1).all()
        assert weights.triu(diagonal=1).abs().max() == 0  # causal
    first_row = out.attentions[0][0, :, 0, 0]  # the first query sees only itself: sigmoid of its own logit
    assert ((first_row > 0) & (first_row < 1)).all()
    assert math.isfinite(float(out.attentions[-1].sum()))


def test_fused_causal_softmax1_matches_float64_reference_forward_and_backward():
    """softmax * sigmoid(lse) forward and the kernel's backward fed (s * grad, output) give softmax-1's gradients."""
    from ds_orthoadam.attention import _causal_sink_attention
    from ds_orthoadam.fused_softmax1 import fused_causal_softmax1

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 19, 16, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous, like Llama's projections
    scale = 0.3
    out = fused_causal_softmax1(q_strided, k, v, scale, reference=_causal_sink_attention)
    assert out is not None, "the CPU flash kernel should pass its self-check"
    causal = torch.ones(19, 19, dtype=torch.bool).tril().expand(2, 1, 19, 19)
    expected, _ = _reference_attention(q, k, v, causal, scale)
    torch.testing.assert_close(out.transpose(1, 2), expected, rtol=1e-10, atol=1e-12)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad.transpose(1, 2))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_kernel_that_fails_its_self_check_is_not_used(monkeypatch):
    from ds_orthoadam import fused_softmax1

    def wrong_forward(q, k, v, scale):
        out, lse, extras = fused_softmax1._cpu_forward(q, k, v, scale)
        return out, lse + 1.0, extras

    broken = fused_softmax1._Kernel("broken", wrong_forward, fused_softmax1._cpu_backward)
    monkeypatch.setattr(fused_softmax1, "_select_kernel", lambda query: broken)
    monkeypatch.setattr(fused_softmax1, "_VERIFIED", {})
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=gen) for _ in range(3))
    with pytest.warns(UserWarning, match="broken"):
        out, _ = softmax1_sdpa_attention(_FakeAttentionModule(), q, k[:, :1], v[:, :1], None, scaling=0.5)
    causal = torch.ones(9, 9, dtype=torch.bool).tril().expand(1, 1, 9, 9)
    expected, _ = _reference_attention(q, k[:, :1], v[:, :1], causal, 0.5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
