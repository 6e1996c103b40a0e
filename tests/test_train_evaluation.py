"""Validation loss of the trainer against cross-entropy computed by hand from the logits."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ds_orthoadam.evaluation import IGNORE_INDEX, causal_lm_inputs, validation_loss
from ds_orthoadam.models import build_model


def test_validation_loss_is_the_token_weighted_mean_over_all_batches():
    torch.manual_seed(0)
    model = build_model("llama-tiny", vocab_size=64, max_seq_len=16)
    full = {"input_ids": torch.randint(0, 64, (3, 16))}
    padded_ids = torch.randint(0, 64, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, 10:] = 0  # a padded sequence: its last 6 positions must not count
    padded = {"input_ids": padded_ids, "attention_mask": mask}

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in (full, padded):
            logits = model(**{k: v for k, v in batch.items()}).logits[:, :-1]
            targets = batch["input_ids"][:, 1:].clone()
            if "attention_mask" in batch:
                targets[batch["attention_mask"][:, 1:] == 0] = IGNORE_INDEX
            total += float(F.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1), reduction="sum",
                                           ignore_index=IGNORE_INDEX))
            count += int((targets != IGNORE_INDEX).sum())
    assert count == 3 * 15 + 9 + 15
    model.train()
    assert math.isclose(validation_loss(model, [full, padded], torch.device("cpu")), total / count, rel_tol=1e-5)
    assert model.training  # mode restored


def test_labels_given_by_the_data_pipeline_are_kept():
    ids = torch.tensor([[1, 5, 6, 2]])
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX]])
    inputs = causal_lm_inputs({"input_ids": ids, "labels": labels, "extra": ids}, torch.device("cpu"))
    assert set(inputs) == {"input_ids", "labels"} and torch.equal(inputs["labels"], labels)
