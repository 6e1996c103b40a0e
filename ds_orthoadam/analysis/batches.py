"""The batch format the analysis consumes: dicts with ``input_ids`` [B, T] and, for padded batches, a right-padded
``attention_mask`` — as produced by ``ds_orthoadam.data.validation_batches`` (extra keys such as ``labels`` are
ignored)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

Batch = Mapping[str, torch.Tensor]


def batch_tensors(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input_ids, attention_mask or None)`` of a batch dict, on ``device``."""
    mask = batch.get("attention_mask")
    return batch["input_ids"].to(device), None if mask is None else mask.to(device)
