"""Perplexity as a running sum of token negative log-likelihoods (memory independent of the number of samples).

ppl = exp(sum of -log p(x_{t+1} | x_{<=t}) / number of predicted tokens), over every position t whose next token is a
real (non-padding) token. Logits are upcast to float32 for the log-softmax. A diverged model's mean NLL may exceed
exp's range (about 709): its perplexity is then infinity, not an OverflowError that would lose the report.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ds_orthoadam.analysis.batches import Batch, batch_tensors
from ds_orthoadam.analysis.hooks import evaluation_mode
from ds_orthoadam.analysis.metrics import model_device, valid_token_mask
from ds_orthoadam.evaluation import perplexity as perplexity_of_loss


class NLLAccumulator:
    """Running sum of next-token negative log-likelihoods and of the number of predicted tokens."""

    def __init__(self) -> None:
        self.total_nll = 0.0
        self.tokens = 0

    def update(self, logits: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor) -> None:
        predicted = valid[:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
        )
        self.total_nll += float(nll[predicted.reshape(-1)].double().sum())
        self.tokens += int(predicted.sum())

    @property
    def perplexity(self) -> float:
        return perplexity_of_loss(self.total_nll / self.tokens) if self.tokens else math.nan


def perplexity(model: PreTrainedModel, batches: Iterable[Batch], description: str | None = None) -> float:
    """Perplexity of ``model`` over ``batches`` (eval mode, no grad; training mode restored afterwards)."""
    accumulator = NLLAccumulator()
    device = model_device(model)
    with evaluation_mode(model):
        for batch in tqdm(batches, desc=description, disable=description is None, leave=False):
            input_ids, attention_mask = batch_tensors(batch, device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            accumulator.update(logits, input_ids, valid_token_mask(input_ids, attention_mask))
    return accumulator.perplexity
