"""The trainer's --activation-checkpointing (train.enable_activation_checkpointing) at ZeRO stages 0-3 with AdamW and
OrthoAdam, one rank in this process: each decoder layer runs twice per micro-batch (forward, recomputation in the
backward), and three steps end where the same run without checkpointing ends.

The reference is the run without checkpointing: the recomputation repeats the forward's arithmetic (fp32, CPU), so
only the order in which gradients are accumulated can differ; Adam's m / sqrt(v) turns a relative gradient difference
of ~1e-7 into weight differences of the same order times lr, far below CHECKPOINTING_TOL (1e-6; measured: 0,
bit-identical, at every stage with both optimisers). The 2-rank ZeRO-3 trainer runs are in tests/test_zero3_train.py.
"""
from __future__ import annotations

import deepspeed
import pytest

import ds_orthoadam
from ds_orthoadam.train import enable_activation_checkpointing
from zero_harness import ds_config, init_single_rank_process_group, loss_of, max_abs_diff, micro_batch, tiny_model

STEPS = 3
CHECKPOINTING_TOL = 1e-6


def _train(stage: int, optimizer: str, checkpointing: bool) -> tuple[list[float], dict, int]:
    """(losses, final whole weights, forward calls of the first layer's MLP) of STEPS steps on one rank (the MLP: transformers
    checkpoints a layer's forward, inside the layer's own hooks)."""
    init_single_rank_process_group()
    model = tiny_model("llama")
    if checkpointing:
        enable_activation_checkpointing(model)
    layer_calls = [0]
    model.model.layers[0].mlp.register_forward_hook(lambda *_: layer_calls.__setitem__(0, layer_calls[0] + 1))
    config = {**ds_config(stage, optimizer), "gradient_accumulation_steps": 1}
    if stage == 3:  # every parameter gathered on use and released, so the recomputation gathers again
        config["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0)
    engine, *_ = ds_orthoadam.initialize(model=model, model_parameters=model.parameters(), config=config)
    engine.train()
    losses = []
    for step in range(STEPS):
        loss = loss_of(engine, micro_batch(step, 0, 0))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return losses, weights, layer_calls[0]


@pytest.mark.parametrize("optimizer", ["AdamW", "OrthoAdam"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_checkpointed_run_recomputes_each_layer_and_ends_where_the_plain_run_ends(stage, optimizer):
    losses, weights, calls = _train(stage, optimizer, checkpointing=False)
    checkpointed_losses, checkpointed_weights, checkpointed_calls = _train(stage, optimizer, checkpointing=True)
    assert (calls, checkpointed_calls) == (STEPS, 2 * STEPS)
    assert checkpointed_losses == pytest.approx(losses, rel=1e-6, abs=0)
    assert max_abs_diff(checkpointed_weights, weights) <= CHECKPOINTING_TOL
