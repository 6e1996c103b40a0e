"""Weight decay applies to the matrices only by default (``--weight-decay-on``), through the trainer's engine set-up."""
from __future__ import annotations

import pytest
import torch

from ds_orthoadam.param_groups import optimizer_groups
from ds_orthoadam.train import build_parser, initialize_engine
from zero_harness import ds_config, init_single_rank_process_group, loss_of, micro_batch, tiny_model


def _exempt_by_name(model: torch.nn.Module) -> set[str]:
    """The parameters the convention exempts, found by their names instead of their shapes."""
    return {name for name, _ in model.named_parameters()
            if name.endswith(".bias") or "norm" in name or ".ln_" in name}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_matrices_decay_and_gains_and_biases_are_exempt(family):
    model = tiny_model(family)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed, exempt = optimizer_groups(model, "matrices")
    assert "weight_decay" not in decayed and exempt["weight_decay"] == 0.0
    assert {names[id(p)] for p in exempt["params"]} == _exempt_by_name(model)
    in_order = [names[id(p)] for p in decayed["params"] + exempt["params"]]
    assert sorted(in_order) == sorted(names.values()) and len(in_order) == len(set(in_order))


def test_all_is_one_group_with_every_parameter_and_a_bad_choice_is_refused():
    model = tiny_model("llama")
    (group,) = optimizer_groups(model, "all")
    assert group["params"] == list(model.parameters())
    with pytest.raises(ValueError, match="matrices, all"):
        optimizer_groups(model, "biases")


def test_the_trainer_defaults_to_matrices():
    args = build_parser().parse_args(["--model", "llama-tiny", "--data", "d", "--tokenizer", "t", "--output-dir", "o"])
    assert args.weight_decay_on == "matrices"


@pytest.mark.parametrize("optimizer", ["AdamW", "OrthoAdam"])
@pytest.mark.parametrize("weight_decay_on", ["matrices", "all"])
def test_a_step_with_zero_gradient_only_decays_what_the_groups_say(optimizer, weight_decay_on):
    """With a zero gradient Adam's update is exactly zero, so one ZeRO-1 step of the trainer's engine changes each
    parameter by decoupled weight decay alone: theta * (1 - lr * wd) where decayed, unchanged where exempt. For
    OrthoAdam the decay happens in the rotated frame and is rotated back (equal up to rounding)."""
    init_single_rank_process_group()
    model = tiny_model("llama")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    lr, weight_decay = 0.1, 0.5
    config = {**ds_config(stage=1, optimizer=optimizer), "gradient_accumulation_steps": 1}
    config["optimizer"]["params"].update(lr=lr, weight_decay=weight_decay)
    engine = initialize_engine(model, config, weight_decay_on)
    engine.backward(loss_of(engine, micro_batch(0, 0, 0)) * 0.0)
    engine.step()
    exempt = _exempt_by_name(model) if weight_decay_on == "matrices" else set()
    assert exempt or weight_decay_on == "all"
    for name, p in engine.module.named_parameters():
        factor = 1.0 if name in exempt else 1.0 - lr * weight_decay
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=0, atol=2e-6, msg=name)


def test_runs_recorded_before_the_option_resume_with_all_and_are_refused_with_the_default(tmp_path):
    """A run.json written before --weight-decay-on existed has no such field; those runs decayed every parameter."""
    from ds_orthoadam.checkpointing import COMPLETE_MARKER, CheckpointError, CheckpointManager
    from ds_orthoadam.train import run_identity

    def identity(weight_decay_on: str) -> dict:
        args = build_parser().parse_args(["--model", "llama-tiny", "--data", "d", "--tokenizer", "t", "--output-dir",
                                          str(tmp_path), "--weight-decay-on", weight_decay_on])
        return run_identity(args, {"name": "llama-tiny"}, {"optimizer": {"type": "AdamW"}}, {"world_size": 2})

    old_identity = identity("all")
    assert "weight_decay_on" not in old_identity and identity("matrices")["weight_decay_on"] == "matrices"
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.claim(old_identity, "auto")
    tag = manager.checkpoint_dir / "global_step2"
    tag.mkdir(parents=True)
    (tag / COMPLETE_MARKER).write_text("{}")
    assert manager.claim(identity("all"), "auto") == "global_step2"
    with pytest.raises(CheckpointError, match="weight_decay_on: checkpoint has None, this run 'matrices'"):
        manager.claim(identity("matrices"), "auto")
