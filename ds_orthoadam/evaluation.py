"""Validation loss and perplexity of a causal LM, token-weighted and averaged over data-parallel ranks."""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.distributed as dist

from ds_orthoadam.data import IGNORE_INDEX


def causal_lm_inputs(batch: Mapping[str, torch.Tensor] | torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """Model keyword arguments for next-token training from a batch of token ids.

    A batch is a tensor of ids or a mapping with ``input_ids`` (and optionally ``attention_mask`` / ``labels``).
    Labels default to the ids, with padded positions (attention_mask 0) ignored; transformers shifts them.
    """
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    inputs = {key: value.to(device) for key, value in batch.items() if key in ("input_ids", "attention_mask", "labels")}
    if "labels" not in inputs:
        labels = inputs["input_ids"].clone()
        if "attention_mask" in inputs:
            labels[inputs["attention_mask"] == 0] = IGNORE_INDEX
        inputs["labels"] = labels
    return inputs


def predicted_tokens(labels: torch.Tensor) -> int:
    """Number of positions that contribute to the loss (every label but the first of a row, minus ignored ones)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: Iterable, device: torch.device, collective: bool = False) -> float:
    """Mean next-token cross-entropy (nats) over all predicted tokens of every rank's ``batches``.

    Each rank evaluates its own batches; token-weighted sums are all-reduced, so the result is the same as one
    process evaluating all batches. The model is returned to its previous train/eval mode.

    ``collective``: every forward is a collective (ZeRO-3 gathers each layer's parameters from all ranks), so every
    rank must run as many forwards as the rank with the most batches: ranks with fewer (the sequences are dealt
    round-robin, so counts differ by one) run :func:`filler_forward` passes that count nothing.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # on the device: NCCL reduces GPU tensors
    fillers = 0
    if collective and dist.is_initialized():  # agreed before any forward: this all-reduce must not meet a gather
        batches = list(batches)
        most = torch.tensor([len(batches)], dtype=torch.int64, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        fillers = int(most) - len(batches)
    for batch in batches:
        inputs = causal_lm_inputs(batch, device)
        count = predicted_tokens(inputs["labels"])
        totals += torch.tensor([float(model(**inputs).loss) * count, count], dtype=torch.float64, device=device)
    for _ in range(fillers):
        filler_forward(model, device)
    model.train(was_training)
    if dist.is_initialized():
        dist.all_reduce(totals)
    if totals[1] == 0:
        raise ValueError("the validation set has no tokens to predict; check --val-data / --val-samples")
    return float(totals[0] / totals[1])


def filler_forward(model: torch.nn.Module, device: torch.device) -> None:
    """A forward whose result is discarded (one sequence of two token-0 ids): it only joins the other ranks'
    parameter gathers."""
    model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device))


def perplexity(loss: float) -> float:
    """exp(loss): infinity where that overflows a float (a diverged model's loss above ~709), NaN for a NaN loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
