"""Hand-constructed tiny models with known attention patterns, shared by the analysis tests.

The GPT2 construction makes every block the identity on the residual stream (value, output and MLP projections are
zero) and gives every token the same query. Only position 0 carries a non-zero residual vector, so only its key can
differ from zero. The attention logits are then known exactly:

* ``sink``: key of position 0 = ``logit`` for every query, all other keys 0.
* ``uniform``: every key 0, so all visible logits are equal.
* ``negative``: every key (including position 0) gives logit ``-logit``: a head that wants to attend nowhere.
"""
from __future__ import annotations

import torch

from ds_orthoadam.models import build_model

SEQ_LEN = 12


def pattern_model(pattern: str, attention: str, logit: float = 8.0):
    model = build_model("gpt2-tiny", attention=attention, vocab_size=64, max_seq_len=32)
    hidden = model.config.n_embd
    head_dim = hidden // model.config.n_head
    # Alternating +-1 has mean 0 and unit variance, so LayerNorm leaves it unchanged.
    marker = torch.tensor([(-1.0) ** i for i in range(hidden)])
    per_dim = logit / head_dim**0.5  # q . k summed over a head, scaled by 1/sqrt(head_dim), gives `logit`
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.zero_()
        model.transformer.wpe.weight[0] = marker
        for block in model.transformer.h:
            weight, bias = block.attn.c_attn.weight, block.attn.c_attn.bias
            weight.zero_()
            bias.zero_()
            bias[:hidden] = 1.0  # the same all-ones query for every token
            if pattern == "sink":
                weight[:, hidden : 2 * hidden] = torch.outer(marker, torch.full((hidden,), per_dim / hidden))
            elif pattern == "negative":
                bias[hidden : 2 * hidden] = -per_dim
            for projection in (block.attn.c_proj, block.mlp.c_proj):
                projection.weight.zero_()
                projection.bias.zero_()
    return model


def expected_first_mass(pattern: str, attention: str, logit: float, query_lengths: list[int]) -> float:
    """Mean weight on key 0 over queries q >= 1 (each sees q + 1 keys), from the softmax / softmax-1 formula."""
    sink = 1.0 if attention == "softmax1" else 0.0
    masses = []
    for length in query_lengths:
        for q in range(1, length):
            keys = q + 1
            if pattern == "sink":
                e = torch.tensor(logit, dtype=torch.float64).exp()
                masses.append(float(e / (sink + e + (keys - 1))))
            elif pattern == "uniform":
                masses.append(1.0 / (sink + keys))
            else:
                e = torch.tensor(-logit, dtype=torch.float64).exp()
                masses.append(float(e / (sink + keys * e)))
    return sum(masses) / len(masses)
