"""Resume on another data-parallel size (issue 17), what works today: DeepSpeed's universal checkpoint.

A 2-rank ZeRO-1 AdamW or OrthoAdam run of the trainer saves a checkpoint; DeepSpeed's ``ds_to_universal`` converts it (the
trainer records the ``universal_checkpoint_info`` the converter requires, so no ``--inject_missing_state``), and a
1-rank engine with ``"checkpoint": {"load_universal": true}`` loads it. Reference: the 2-rank checkpoint's own files,
its two flat optimizer partitions concatenated (padding cut) and its module weights.

OrthoAdam: the master and moments are in the rotated frame phi and are carried as they are (the rotations depend
only on the recorded spec, so they stay valid at any data-parallel size); DeepSpeed copies the loaded master into the
module (ds_internals.universal_load_copies_master_into_module), which the OrthoAdam hooks rotate back to theta. That
the module equals the saved theta bit for bit checks both (without the rotation back it differs by up to ~4).
"""
from __future__ import annotations

import argparse
import subprocess
import sys

import deepspeed
import pytest
import torch

from ds_orthoadam import train
from ds_orthoadam.checkpointing import CLIENT_STATE_KEY
from ds_orthoadam.models import build_model
from test_train_e2e import corpus, launch  # noqa: F401  (corpus is a fixture)
from zero_harness import init_single_rank_process_group

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("optimizer", ["adamw", "orthoadam"])
def test_a_two_rank_zero1_checkpoint_loads_on_one_rank_with_its_optimizer_state_exact(corpus, tmp_path,  # noqa: F811
                                                                                       optimizer):
    run_dir, universal = tmp_path / "two_ranks", tmp_path / "universal"
    returncode, output = launch(corpus, run_dir, "--optimizer", optimizer, "--train-steps", "2", "--log-every", "1",
                                "--eval-every", "0", "--no-export")
    assert returncode == 0, output
    tag_dir = run_dir / "checkpoints" / "global_step2"
    converted = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                str(tag_dir), "--output_folder", str(universal / "global_step2"),
                                "--num_extract_workers", "1", "--num_merge_workers", "1"],
                               capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, converted.stdout[-2000:] + converted.stderr[-2000:]

    saved = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
    args = argparse.Namespace(**saved[CLIENT_STATE_KEY]["args"])
    config = {**train.compose_config(args, 1), "checkpoint": {"load_universal": True}}
    init_single_rank_process_group()
    deepspeed.init_distributed()
    torch.manual_seed(12345)  # other initial weights than the run's: everything below must come from the checkpoint
    engine = train.initialize_engine(build_model(**saved[CLIENT_STATE_KEY]["run"]["model_args"]), config,
                                     args.weight_decay_on)
    load_path, _ = engine.load_checkpoint(str(universal), tag="global_step2")
    assert load_path is not None

    partitions = [torch.load(tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                             weights_only=False)["optimizer_state_dict"] for rank in range(2)]
    inner = engine.optimizer.optimizer
    assert len(inner.param_groups) == 2  # decayed and exempt (norm gains) groups
    for group, param_group in enumerate(inner.param_groups):
        master = param_group["params"][0]
        state = inner.state[master]
        whole = master.numel()
        for key in ("exp_avg", "exp_avg_sq"):
            before = torch.cat([p["base_optimizer_state"]["state"][group][key] for p in partitions])
            assert torch.equal(state[key], before[:whole]) and not before[whole:].any(), key
        assert torch.equal(master.detach(), torch.cat([p["single_partition_of_fp32_groups"][group]
                                                       for p in partitions])[:whole])
        assert float(state["step"]) == float(partitions[0]["base_optimizer_state"]["state"][group]["step"]) == 2
    module = engine.module.state_dict()
    assert all(torch.equal(module[name], weight) for name, weight in saved["module"].items())
    assert engine.global_steps == 2
