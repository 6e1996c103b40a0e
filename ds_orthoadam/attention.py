"""softmax-1 attention ("off-by-one" softmax) for transformers models.

    softmax1(x)_i = exp(x_i) / (1 + sum_j exp(x_j))

The extra 1 in the denominator lets a head put (almost) all of its mass *nowhere* instead of dumping it on the first
token, which is what creates attention sinks (Kaul et al., ICLR 2025). It equals an ordinary softmax over the logits
plus one extra logit fixed at 0 whose value vector is zero — a "zero sink" — and that identity gives the
memory-efficient implementation below.

Three implementations are registered with ``transformers.AttentionInterface``:

* ``softmax1_eager``: materialises the T x T probabilities and returns them (needed for analysis).
* ``softmax1_sdpa``: never materialises the probability matrix. For a purely causal batch (the training case) it
  takes a fused kernel's output and log-sum-exp, softmax-1 = softmax * sigmoid(lse), at the cost of plain causal
  attention (``ds_orthoadam.fused_softmax1``); otherwise (padding masks, dropout, or where no fused kernel passed its
  self-check) it appends a zero key/value column and calls ``scaled_dot_product_attention``.
* ``softmax1``: picks ``softmax1_eager`` when the caller asked for attention weights
  (``output_attentions=True``) and ``softmax1_sdpa`` otherwise. This is the name models are built with.

Every name is registered together with transformers' boolean SDPA mask function. Without a registered mask function
transformers hands the attention function no mask at all and padding is silently lost. For a purely causal batch
(no padding) that mask is ``None`` and the functions here apply causality themselves; the fused path then puts the
sink in front of the keys and uses torch's bottom-right causal bias (flash kernels on GPUs, no mask tensor).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import output_capturing

from ds_orthoadam.fused_softmax1 import fused_causal_softmax1

SOFTMAX1_AUTO = "softmax1"
SOFTMAX1_EAGER = "softmax1_eager"
SOFTMAX1_SDPA = "softmax1_sdpa"
SOFTMAX1_IMPLEMENTATIONS = (SOFTMAX1_AUTO, SOFTMAX1_EAGER, SOFTMAX1_SDPA)


def softmax1(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Numerically stable softmax-1 along ``dim``, accumulated in float32 (or float64 for float64 input).

    Uses m = max(max_j x_j, 0): exp(x_i - m) / (exp(-m) + sum_j exp(x_j - m)). Exact for logits of +-1e4 and for
    fully masked rows (all -inf), which give all-zero probabilities instead of softmax's NaNs.
    """
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(compute_dtype)
    # The result does not depend on m; detaching it keeps the gradient of max() out of the graph.
    shift = x.detach().amax(dim=dim, keepdim=True).clamp(min=0.0)
    exp_x = torch.exp(x - shift)
    probs = exp_x / (torch.exp(-shift) + exp_x.sum(dim=dim, keepdim=True))
    return probs.to(logits.dtype)


def _causal_mask(query_length: int, kv_length: int, device: torch.device) -> torch.Tensor:
    """Boolean causal mask, upper-left aligned like SDPA's ``is_causal``: query i sees keys 0..i."""
    return torch.ones(query_length, kv_length, dtype=torch.bool, device=device).tril()


def _explicit_mask(
    module: nn.Module, query: torch.Tensor, kv_length: int, attention_mask: torch.Tensor | None, kwargs: dict
) -> torch.Tensor | None:
    """The mask to apply, or None when every query may see every key.

    transformers passes ``attention_mask=None`` when the mask is purely causal and expects SDPA's ``is_causal``
    (``masking_utils._ignore_causal_mask_sdpa``): one query sees every key; several queries see keys upper-left
    aligned. That is also right where the keys outnumber the queries, a static cache's first forward: the cache's
    later slots are not written yet, and each would add exp(0) to softmax-1's denominator if it were visible.
    """
    if attention_mask is not None:
        return attention_mask[..., :kv_length]
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if is_causal and query.shape[2] > 1:
        return _causal_mask(query.shape[2], kv_length, query.device)
    return None


def _apply_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


def softmax1_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax-1 attention that materialises and returns the probabilities [B, H, T, S]; output is [B, T, H, D]."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    # Scaled before the product, as SDPA does: an unscaled fp16 q.k can overflow where the logit itself fits.
    scores = torch.matmul(query * scale, key.transpose(2, 3))
    mask = _explicit_mask(module, query, key.shape[2], attention_mask, kwargs)
    probs = softmax1(_apply_mask(scores, mask)).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


def _append_zero_sink(tensor: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B, H, S + 1, D] with a zero row: a key with logit 0 and a value that contributes nothing."""
    return F.pad(tensor, (0, 0, 0, 1))


def _sink_mask(mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
    """Extend a mask by one always-visible sink column (a fully masked row then yields zeros, not NaN)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return F.pad(mask, (0, 1), value=True)
    return F.pad(mask.to(query.dtype), (0, 1), value=0.0)


def _causal_sink_attention(query, key, value, scale: float | None, dropout: float = 0.0) -> torch.Tensor:
    """Purely causal softmax-1 without a mask tensor on GPUs (flash / memory-efficient kernels).

    The zero sink goes *in front* of the keys; with a bottom-right-aligned causal bias query i then sees the sink and
    keys 0..i. torch dispatches ``causal_lower_right`` to the flash kernel's native causal mode on CUDA; on CPU it
    materialises one shared T x (T + 1) boolean mask.
    """
    front = (0, 0, 1, 0)
    bias = causal_lower_right(query.shape[2], key.shape[2] + 1)
    return F.scaled_dot_product_attention(
        query, F.pad(key, front), F.pad(value, front), attn_mask=bias, dropout_p=dropout, scale=scale
    )


def softmax1_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """softmax-1 attention through fused kernels; no T x T probabilities are stored (see the module docstring)."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    query_length, kv_length = query.shape[2], key.shape[2]
    mask = _explicit_mask(module, query, kv_length, attention_mask, kwargs)
    if attention_mask is None and mask is not None and query_length == kv_length:
        output = None
        if dropout == 0.0:
            scale = query.shape[-1] ** -0.5 if scaling is None else scaling
            output = fused_causal_softmax1(query, key, value, scale, reference=_causal_sink_attention)
        if output is None:
            output = _causal_sink_attention(query, key, value, scaling, dropout)
    else:
        output = F.scaled_dot_product_attention(
            query,
            _append_zero_sink(key),
            _append_zero_sink(value),
            attn_mask=_sink_mask(mask, query),
            dropout_p=dropout,
            scale=scaling,
        )
    return output.transpose(1, 2).contiguous(), None


def attention_weights_requested(kwargs: dict) -> bool:
    """True when the running forward pass was asked for ``output_attentions``.

    Llama-style models pass the flag through to the attention function; GPT2 pops it and only records the
    attention module's outputs through transformers' output collector, so that collector is consulted too.
    ``tests/test_attention.py`` checks both routes, so a transformers upgrade that changes them fails loudly.
    """
    if kwargs.get("output_attentions"):
        return True
    collected = output_capturing._active_collector.get()
    return bool(collected) and "attentions" in collected


def softmax1_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The ``softmax1`` implementation: eager when attention weights are wanted, fused SDPA otherwise."""
    if attention_weights_requested(kwargs):
        return softmax1_eager_attention(module, query, key, value, attention_mask, **kwargs)
    return softmax1_sdpa_attention(module, query, key, value, attention_mask, **kwargs)


def register_softmax1() -> None:
    """Register every softmax-1 implementation and its mask function with transformers (idempotent)."""
    functions = {
        SOFTMAX1_AUTO: softmax1_attention,
        SOFTMAX1_EAGER: softmax1_eager_attention,
        SOFTMAX1_SDPA: softmax1_sdpa_attention,
    }
    for name, function in functions.items():
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)
