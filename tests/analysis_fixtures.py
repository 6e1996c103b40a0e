"""Shared by the analysis tests: tiny saved model directories with a tokenizer, a tiny corpus, and hand-constructed
models with known attention patterns.

The GPT2 construction makes every block the identity on the residual stream (value, output and MLP projections are
zero) and gives every token the same query. Only position 0 carries a non-zero residual vector, so only its key can
differ from zero. The attention logits are then known exactly:

* ``sink``: key of position 0 = ``logit`` for every query, all other keys 0.
* ``uniform``: every key 0, so all visible logits are equal.
* ``negative``: every key (including position 0) gives logit ``-logit``: a head that wants to attend nowhere.
"""
from __future__ import annotations

import gzip
import json
import os
import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ds_orthoadam.models import build_model

WORDS = ("the of and to in is was for on that with as by at from his her an which were are this be it had not "
         "but or have they their one all been has more when who will would there can into its out some time "
         "other river city north winter light stone garden music letter morning").split()
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

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


def documents(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(count)]


def write_corpus(directory: str, count: int = 40) -> dict[str, str]:
    """The same documents as a C4-format shard directory, a json.gz file and a blank-line separated .txt file."""
    texts = documents(count)
    shard_dir = os.path.join(directory, "c4")
    os.makedirs(shard_dir, exist_ok=True)
    shard = os.path.join(shard_dir, "c4-validation.00000-of-00001.json.gz")
    with gzip.open(shard, "wt", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": "x"}) + "\n")
    text_path = os.path.join(directory, "corpus.txt")
    with open(text_path, "w", encoding="utf-8") as handle:
        handle.write("\n\n".join(texts))
    return {"dir": shard_dir, "json": shard, "txt": text_path}


def word_tokenizer(extra_words: int = 0) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over WORDS (plus ``extra_words`` dummy entries to inflate the vocabulary)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(WORDS) + [f"w{i}" for i in range(extra_words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def save_tiny_model(directory: str, name: str, attention: str, seed: int = 0, tokenizer_words: int = 0) -> str:
    """Save a randomly initialised tiny model and a word tokenizer to ``directory`` (like an exported run)."""
    torch.manual_seed(seed)
    model = build_model(name, attention=attention, vocab_size=96, max_seq_len=64)
    model.save_pretrained(directory)
    word_tokenizer(tokenizer_words).save_pretrained(directory)
    return directory
