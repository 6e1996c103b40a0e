"""Which parameters weight decay applies to: the optimiser's parameter groups.

Decoupled weight decay is meant for the matrices (linear layers, embeddings). On normalisation gains and biases it
pulls every channel's gain towards zero except where the gradient holds it up, so the gains end up uneven: a
per-channel scale is exactly the privileged basis OrthoAdam is there to remove, made by the regulariser instead of
the optimiser. Megatron-LM, nanoGPT and the Hugging Face Trainer therefore exempt one-dimensional parameters, and so
does the trainer by default (``--weight-decay-on matrices``); ``all`` decays every parameter. The measured effect on
the testbed is in docs/testbed.md ("Levers, measured"). The paper-size configs use no weight decay, where the choice
changes nothing.

Both groups keep the model's parameter order, and OrthoAdam stays exact with them: a whole parameter exempt from
decay is as rotation invariant as a decayed one (tests/test_zero_orthoadam.py checks the groups against
single-process OrthoAdam).
"""
from __future__ import annotations

import torch

WEIGHT_DECAY_CHOICES = ("matrices", "all")


def full_shape(parameter: torch.nn.Parameter) -> torch.Size:
    """The parameter's whole shape, also when ZeRO-3 (``deepspeed.zero.Init``) has partitioned it: its local data
    is then an empty 1-D tensor and DeepSpeed keeps the shape in ``ds_shape``."""
    return getattr(parameter, "ds_shape", parameter.shape)


def optimizer_groups(model: torch.nn.Module, weight_decay_on: str) -> list[dict]:
    """The parameter groups for the optimiser: ``[{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]``
    (an empty group is left out; the config's weight decay applies to the first)."""
    if weight_decay_on not in WEIGHT_DECAY_CHOICES:
        raise ValueError(f"weight_decay_on must be one of {', '.join(WEIGHT_DECAY_CHOICES)}, got {weight_decay_on!r}")
    parameters = list(model.parameters())
    if weight_decay_on == "all":
        return [{"params": parameters}]
    decayed = [p for p in parameters if len(full_shape(p)) >= 2]
    exempt = [p for p in parameters if len(full_shape(p)) < 2]
    groups = [{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
