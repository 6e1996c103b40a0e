"""ds_configs/ and the trainer's config, checkpoint-directory and FLOP bookkeeping (no processes launched)."""
from __future__ import annotations

from pathlib import Path

import pytest

from ds_orthoadam import run_config
from ds_orthoadam.checkpointing import COMPLETE_MARKER, CheckpointError, CheckpointManager
from ds_orthoadam.models import MODEL_SPECS, build_model, meta_parameter_count
from ds_orthoadam.telemetry import flops_per_token

REPO = Path(__file__).resolve().parent.parent
# Training setup from the paper (shared/PAPER.md): warmup and total steps per model size, 8 V100s, batch 512.
PAPER_SCHEDULE = {"60m": (1000, 160_000), "130m": (2000, 320_000), "350m": (6000, 960_000), "1.4b": (10_000, 600_000)}
PAPER_GPUS, PAPER_BATCH, PAPER_MAX_LR = 8, 512, 1e-3
# Beyond the paper (docs/training.md): ZeRO-3, the 1.4B run's warmup and tokens per parameter (total steps in
# proportion to the Llama sibling's parameters, to 10k steps), max LR scaled by 2048 / hidden.
BEYOND_PAPER = ("3b", "7b")
CPU_CONFIGS = set(run_config.CPU_CONFIGS.values())  # cpu.json (tests), testbed.json (the testbed): not paper sizes
SIZE_CONFIGS = sorted(p for p in (REPO / "ds_configs").glob("*.json") if p.name not in CPU_CONFIGS)


def test_every_trained_size_has_exactly_one_config():
    trained = {name for name in MODEL_SPECS if not name.endswith(tuple(run_config.CPU_CONFIGS))}
    assert {p.stem for p in SIZE_CONFIGS} == trained


@pytest.mark.parametrize("path", SIZE_CONFIGS, ids=lambda p: p.stem)
def test_size_config_follows_the_paper(path):
    config = run_config.read_json(path)
    run_config.validate(config, PAPER_GPUS)
    size = path.stem.split("-", 1)[1]
    micro = config["train_micro_batch_size_per_gpu"]
    assert config["train_batch_size"] == PAPER_BATCH
    assert PAPER_BATCH % (micro * PAPER_GPUS) == 0
    assert run_config.gradient_accumulation_steps(config, PAPER_GPUS) * micro * PAPER_GPUS == PAPER_BATCH
    if size in BEYOND_PAPER:
        warmup, steps_14b = PAPER_SCHEDULE["1.4b"]
        ratio = meta_parameter_count(f"llama-{size}") / meta_parameter_count("llama-1.4b")
        assert run_config.scheduler_steps(config) == (warmup, round(steps_14b * ratio, -4))
        assert config["optimizer"]["params"]["lr"] == pytest.approx(PAPER_MAX_LR * 2048 / MODEL_SPECS[path.stem].hidden)
        assert config["zero_optimization"]["stage"] == 3
    else:
        assert run_config.scheduler_steps(config) == PAPER_SCHEDULE[size]
        assert config["optimizer"]["params"]["lr"] == PAPER_MAX_LR
        assert config["zero_optimization"]["stage"] == 1
    assert config["fp16"]["enabled"] and config["fp16"]["loss_scale"] == 0  # 0 = dynamic loss scaling
    assert isinstance(config["fp16"]["initial_scale_power"], int)
    assert isinstance(config["gradient_clipping"], float)
    assert config["tensorboard"]["enabled"]


@pytest.mark.parametrize("path", [p for p in SIZE_CONFIGS if p.stem.endswith(BEYOND_PAPER)], ids=lambda p: p.stem)
def test_zero3_configs_are_valid_for_deepspeed_and_follow_the_documented_rule(path):
    """DeepSpeed's own ZeRO config model (which refuses unknown keys) accepts the stage-3 section, and its sizes
    follow the rule docs/zero3.md gives (transformers' "auto" values for ZeRO-3): buckets of hidden^2 elements,
    prefetch 0.9 hidden^2, parameters under 10 x hidden elements kept whole on every rank (norm gains)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = run_config.read_json(path)["zero_optimization"]
    parsed = DeepSpeedZeroConfig(**zero)
    hidden = MODEL_SPECS[path.stem].hidden
    assert parsed.stage == 3 and parsed.overlap_comm and parsed.contiguous_gradients
    assert parsed.reduce_bucket_size == hidden * hidden
    assert parsed.prefetch_bucket_size == int(0.9 * hidden * hidden)
    assert hidden < parsed.param_persistence_threshold == 10 * hidden < hidden * hidden  # gains persist, matrices don't
    assert not parsed.gather_16bit_weights_on_model_save  # the export reads the checkpoint's fp32 (zero_to_fp32)
    with pytest.raises(ValueError):
        DeepSpeedZeroConfig(**{**zero, "stage3_prefetch_bucket_sise": 1})


def test_cpu_config_runs_on_two_cpu_ranks_without_fp16():
    config = run_config.read_json(REPO / "ds_configs" / "cpu.json")
    run_config.validate(config, 2)
    assert not config["fp16"]["enabled"] and config["zero_optimization"]["stage"] == 1


def test_orthoadam_variant_changes_only_the_optimizer_type():
    base = REPO / "ds_configs" / "llama-130m.json"
    plain = run_config.compose_ds_config(base)
    ortho = run_config.compose_ds_config(base, [run_config.variant_path("orthoadam")])
    assert run_config.optimizer_type(ortho) == "OrthoAdam"
    assert {k: v for k, v in ortho["optimizer"]["params"].items() if k in plain["optimizer"]["params"]} == \
        plain["optimizer"]["params"]
    assert {k: v for k, v in ortho.items() if k != "optimizer"} == {k: v for k, v in plain.items() if k != "optimizer"}
    adamw = run_config.compose_ds_config(base, [run_config.variant_path("adamw")])
    assert adamw == plain


def test_a_config_file_that_is_not_utf8_is_a_run_config_error(tmp_path):
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(run_config.RunConfigError, match="binary.json is not valid JSON"):
        run_config.read_json(path)


def test_set_assignments_parse_json_values_and_nest():
    config = run_config.compose_ds_config(REPO / "ds_configs" / "cpu.json", [],
                                          ["scheduler.params.total_num_steps=100", "optimizer.params.betas=[0.9,0.95]"])
    assert config["scheduler"]["params"]["total_num_steps"] == 100
    assert config["scheduler"]["params"]["warmup_num_steps"] == 30  # siblings kept
    assert config["optimizer"]["params"]["betas"] == [0.9, 0.95]
    with pytest.raises(run_config.RunConfigError, match="dotted.key=value"):
        run_config.parse_assignment("no_equals_sign")


@pytest.mark.parametrize("edit, message", [
    ({"train_batch_size": 100}, "not divisible"),
    ({"gradient_accumulation_steps": 3}, "inconsistent batch arithmetic"),
    ({"train_micro_batch_size_per_gpu": 0}, "positive integer"),
    ({"gradient_clipping": None}, "gradient_clipping"),
    ({"scheduler": {"type": "WarmupLR"}}, "WarmupCosineLR"),
])
def test_bad_configs_are_named(edit, message):
    config = run_config.deep_merge(run_config.read_json(REPO / "ds_configs" / "llama-60m.json"), edit)
    if edit.get("gradient_clipping", 0) is None:
        del config["gradient_clipping"]
    with pytest.raises(run_config.RunConfigError, match=message):
        run_config.validate(config, PAPER_GPUS)


def test_fp16_without_initial_scale_power_is_refused():
    config = run_config.read_json(REPO / "ds_configs" / "llama-60m.json")
    del config["fp16"]["initial_scale_power"]
    with pytest.raises(run_config.RunConfigError, match="initial_scale_power"):
        run_config.validate(config, PAPER_GPUS)


@pytest.mark.parametrize("assignment", ["fp16=true", "csv_monitor=true"])
def test_a_section_set_to_a_non_object_is_named(assignment, capsys, monkeypatch):
    name = assignment.split("=")[0]
    status, err = _train_main(capsys, monkeypatch, "--model", "llama-60m", "--set", assignment, world_size="8")
    assert status == 2 and f"error: {name} must be a JSON object in the DeepSpeed config" in err


def _train_main(capsys, monkeypatch, *extra: str, world_size: str = "2") -> tuple[int, str]:
    """Exit status and stderr of the trainer's main() for input it must refuse before any process group exists."""
    from ds_orthoadam.train import main

    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("RANK", "0")  # as under a launcher: no single-process defaults leak into os.environ
    try:
        status = main(["--data", "unused", "--tokenizer", "unused", "--output-dir", "unused", *extra])
    except SystemExit as exit_:  # argparse
        status = exit_.code
    return status, capsys.readouterr().err


def test_cli_rejects_bad_input_before_starting_anything(capsys, monkeypatch):
    status, err = _train_main(capsys, monkeypatch, "--model", "llama-70b")
    assert status == 2 and "invalid choice: 'llama-70b'" in err
    status, err = _train_main(capsys, monkeypatch, "--model", "llama-60m", "--ds-config", "nope.json")
    assert status == 2 and "nope.json does not exist" in err
    status, err = _train_main(capsys, monkeypatch, "--model", "llama-60m", "--train-steps", "0")
    assert status == 2 and "--train-steps: must be an integer >= 1, got 0" in err
    status, err = _train_main(capsys, monkeypatch, "--model", "llama-60m", world_size="3")
    assert status == 2 and "inconsistent batch arithmetic" in err


@pytest.mark.parametrize("assignment, message", [
    ("zero_optimization.stage=7", "zero_optimization.stage must be an integer 0, 1, 2 or 3, got 7"),
    ("zero_optimization.stage=true", "zero_optimization.stage must be an integer 0, 1, 2 or 3, got True"),
    ("zero_optimization=3", "zero_optimization must be a JSON object in the DeepSpeed config, e.g. --set "
                            "zero_optimization.stage=1"),
    ("optimizer.params.lr=abc", "optimizer.params.lr must be a number, got 'abc'"),
    ("optimizer.params=1", "optimizer.params must be a JSON object"),
    ("gradient_clipping=null", "gradient_clipping must be a number >= 0 (0 turns clipping off), got None"),
    ("gradient_clipping=-1", "gradient_clipping must be a number >= 0"),
    ("gradient_clipping=\"1.0\"", "gradient_clipping must be a number >= 0"),
])
def test_config_values_deepspeed_would_crash_on_are_one_line_errors(assignment, message, capsys, monkeypatch):
    """Values DeepSpeed only rejects deep inside initialize (pydantic dump, TypeError at the first step) are refused
    before any process group exists, on the AdamW path as on OrthoAdam's."""
    status, err = _train_main(capsys, monkeypatch, "--model", "llama-60m", "--optimizer", "adamw", "--set", assignment,
                              world_size="8")
    assert status == 2 and err.startswith("error: ") and message in err, err
    assert len(err.splitlines()) == 1


def test_deepspeed_errors_name_the_likely_field():
    config = run_config.read_json(REPO / "ds_configs" / "llama-60m.json")
    on_cpu = run_config.deepspeed_error_message(ValueError("Type fp16 is not supported on your device."), config)
    assert "--ds-config ds_configs/cpu.json" in on_cpu and "--set fp16.enabled=false" in on_cpu
    pydantic_like = ValueError("1 validation error for DeepSpeedZeroConfig\nstage\n  Input should be 0, 1, 2 or 3")
    message = run_config.deepspeed_error_message(pydantic_like, config)
    assert "check zero_optimization.stage" in message and "\n" not in message
    unknown = run_config.deepspeed_error_message(TypeError("unsupported operand"), config)
    assert "TypeError: unsupported operand" in unknown and "--ds-config, --ds-override and --set" in unknown


def test_seq_len_below_two_is_refused_by_argparse(capsys, monkeypatch):
    status, err = _train_main(capsys, monkeypatch, "--model", "llama-60m", "--seq-len", "1", world_size="8")
    assert status == 2 and "--seq-len: must be an integer >= 2, got 1" in err


@pytest.mark.parametrize("where", ["a file", "below a file", "unwritable"])
def test_an_unusable_output_dir_is_a_one_line_error(where, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    output_dir = {"a file": tmp_path / "file", "below a file": tmp_path / "file" / "run", "unwritable": "/proc/run"}
    status, err = _train_main(capsys, monkeypatch, "--model", "llama-60m", "--output-dir", str(output_dir[where]),
                              world_size="8")
    assert status == 2, err
    assert err.startswith(f"error: --output-dir {output_dir[where]} cannot be used as the run directory (") and \
        "pass a directory that you can write to" in err and len(err.splitlines()) == 1, err


def test_check_only_checks_the_shared_inputs_without_starting_a_process_group(corpus, tokenizer_dir, tmp_path,
                                                                              capsys, monkeypatch):
    """The launch scripts' pre-flight (--check-only): good inputs pass in this one process, with no process group,
    and a bad one is the same one-line error the ranks would print."""
    import deepspeed
    import torch.distributed as dist

    def no_process_group(*args, **kwargs):
        raise AssertionError("--check-only started a process group")

    monkeypatch.setattr(deepspeed, "init_distributed", no_process_group)
    monkeypatch.setattr(dist, "init_process_group", no_process_group)
    initialized_before = dist.is_initialized()  # an earlier in-process test may have left one: not ours to judge
    good = ("--model", "llama-tiny", "--data", corpus["dir"], "--tokenizer", tokenizer_dir,
            "--output-dir", str(tmp_path / "run"), "--check-only")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    from ds_orthoadam.train import main

    assert main(list(good)) == 0 and dist.is_initialized() == initialized_before
    assert (tmp_path / "run").is_dir() and not any((tmp_path / "run").iterdir())
    bad = {"--tokenizer": str(tmp_path / "no-tokenizer"), "--data": str(tmp_path / "no-data"),
           "--val-data": str(tmp_path / "no-val")}
    for option, value in bad.items():
        capsys.readouterr()
        assert main([*good, option, value]) == 2, option
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and value in err[0], (option, err)
    assert main([*good, "--set", "train_batch_size=3"]) == 2  # batch arithmetic for WORLD_SIZE=2 ranks


def test_resuming_past_the_last_step_is_refused():
    from ds_orthoadam.train import ArgumentConflict, check_resume_reaches

    check_resume_reaches(None, 2)
    check_resume_reaches("global_step4", 4)  # a finished run: re-running it only exports again
    with pytest.raises(ArgumentConflict, match="global_step4.* at step 4, past the last step 2 .*--train-steps 4"):
        check_resume_reaches("global_step4", 2)


def test_help_documents_every_option():
    from ds_orthoadam.train import build_parser

    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.help != "==SUPPRESS==" and action.option_strings:
            assert action.help, action.option_strings
            assert action.option_strings[-1] in text


def _fake_checkpoint(manager: CheckpointManager, step: int, complete: bool) -> Path:
    tag_dir = manager.checkpoint_dir / f"global_step{step}"
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"")
    if complete:
        (tag_dir / COMPLETE_MARKER).write_text("{}")
    return tag_dir


def test_output_dir_of_another_run_is_refused(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    identity = {"model_args": {"name": "llama-tiny"}, "optimizer": "OrthoAdam"}
    assert manager.claim(identity, "auto") is None  # fresh directory: claimed
    _fake_checkpoint(manager, 10, complete=True)
    with pytest.raises(CheckpointError, match="another run .*optimizer: checkpoint has 'OrthoAdam', this run 'AdamW'"):
        manager.claim({**identity, "optimizer": "AdamW"}, "auto")
    with pytest.raises(CheckpointError, match="--resume auto"):
        manager.claim(identity, "none")
    (tmp_path / "run.json").unlink()
    with pytest.raises(CheckpointError, match="no run.json"):
        manager.claim(identity, "auto")


def test_a_refusal_names_only_the_nested_fields_that_differ(tmp_path):
    """Another --seed changes one field of the data policy: the message names that field, not the two dicts."""
    manager = CheckpointManager(tmp_path, keep_last=2)
    policy = {"source": "c4", "seed": 0, "world_size": 2, "bos": True}
    identity = {"model_args": {"name": "llama-tiny"}, "optimizer": "OrthoAdam", "data_policy": policy}
    manager.claim(identity, "auto")
    _fake_checkpoint(manager, 10, complete=True)
    with pytest.raises(CheckpointError) as refused:
        manager.claim({**identity, "data_policy": {**policy, "seed": 1}}, "auto")
    message = str(refused.value)
    assert "data_policy.seed: checkpoint has 0, this run 1" in message
    assert "source" not in message and "world_size" not in message and "model_args" not in message


def test_a_refusal_for_two_differing_fields_names_both_and_the_fix(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    identity = {"optimizer": "OrthoAdam", "data_policy": {"seed": 0, "world_size": 2}}
    manager.claim(identity, "auto")
    _fake_checkpoint(manager, 10, complete=True)
    with pytest.raises(CheckpointError) as refused:
        manager.claim({"optimizer": "AdamW", "data_policy": {"seed": 1, "world_size": 2}}, "auto")
    message = str(refused.value)
    assert "optimizer: checkpoint has 'OrthoAdam', this run 'AdamW'" in message
    assert "data_policy.seed: checkpoint has 0, this run 1" in message and "choose a new --output-dir" in message


def test_a_resumed_run_keeps_the_data_streams_of_the_ranks_it_started_on(tmp_path):
    from ds_orthoadam.train import recorded_data_streams

    manager = CheckpointManager(tmp_path, keep_last=2)
    assert recorded_data_streams(manager, world_size=4) == 4  # a new run: one stream per rank
    manager.claim({"optimizer": "AdamW", "data_policy": {"seed": 0, "world_size": 2}}, "auto")
    assert recorded_data_streams(manager, world_size=4) == 4  # no complete checkpoint yet: still a new run
    _fake_checkpoint(manager, 10, complete=True)
    assert recorded_data_streams(manager, world_size=4) == 2


@pytest.mark.parametrize("partition_files, stage, world_size, universal", [
    (0, 0, 3, False),  # stage 0 in fp32: the optimizer state is whole, loads anywhere
    (2, 1, 2, False),  # the saving number of ranks: a plain load
    (2, 1, 1, True), (1, 2, 2, True), (2, 3, 1, True),  # ZeRO 1-3 elsewhere: DeepSpeed's universal checkpoint
])
def test_another_number_of_ranks_loads_zero_1_2_as_a_universal_checkpoint(tmp_path, partition_files, stage,
                                                                          world_size, universal):
    from ds_orthoadam.train import resumes_on_other_ranks

    manager = CheckpointManager(tmp_path, keep_last=2)
    tag_dir = _fake_checkpoint(manager, 10, complete=True)
    for rank in range(partition_files):
        (tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    config = {"zero_optimization": {"stage": stage}}
    assert resumes_on_other_ranks(manager, "global_step10", config, world_size) is universal
    assert resumes_on_other_ranks(manager, None, config, world_size) is False  # nothing to resume


@pytest.mark.parametrize("prefix, stage", [("bf16_", 0)])
def test_partitioned_state_that_cannot_be_converted_is_refused_naming_the_saving_ranks(tmp_path, prefix, stage):
    from ds_orthoadam.train import ArgumentConflict, resumes_on_other_ranks

    manager = CheckpointManager(tmp_path, keep_last=2)
    tag_dir = _fake_checkpoint(manager, 10, complete=True)
    for rank in range(2):
        (tag_dir / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ArgumentConflict, match=f"saved by 2 ranks and ZeRO stage {stage} .*resume it on 2 ranks"):
        resumes_on_other_ranks(manager, "global_step10", {"zero_optimization": {"stage": stage}}, 1)


@pytest.mark.parametrize("content, message", [('{"model_args": ', "is not valid JSON"),
                                              (b"\xff\xfe{}", "is not valid JSON"),
                                              ("[1]", "does not hold a JSON object")])
def test_a_corrupt_run_file_is_one_clear_error(tmp_path, content, message):
    manager = CheckpointManager(tmp_path, keep_last=2)
    _fake_checkpoint(manager, 2, complete=True)
    run_file = tmp_path / "run.json"
    run_file.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CheckpointError, match=f"run.json {message}.*restore it from a copy"):
        manager.claim({"model_args": {"name": "llama-tiny"}}, "auto")


def test_resume_auto_takes_the_newest_complete_checkpoint_and_drops_incomplete_ones(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    identity = {"model_args": {"name": "llama-tiny"}}
    manager.claim(identity, "none")
    _fake_checkpoint(manager, 5, complete=True)
    _fake_checkpoint(manager, 20, complete=True)
    interrupted = _fake_checkpoint(manager, 30, complete=False)
    assert manager.claim(identity, "auto") == "global_step20"
    assert not interrupted.exists()
    assert manager.claim(identity, "global_step5") == "global_step5"
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        manager.claim(identity, "global_step30")


class _FakeEngine:
    """Stands in for a DeepSpeed engine: writes a file into the tag directory, or fails as told."""

    def __init__(self, save_error: Exception | None = None, load_error: Exception | None = None) -> None:
        self.save_error, self.load_error = save_error, load_error

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"new")
        if self.save_error is not None:
            raise self.save_error

    def load_checkpoint(self, load_dir: str, tag: str):
        raise self.load_error


def test_resuming_an_older_tag_moves_the_newer_ones_aside_and_prunes_only_this_run(tmp_path, capsys):
    manager = CheckpointManager(tmp_path, keep_last=1)
    identity = {"model_args": {"name": "llama-tiny"}}
    manager.claim(identity, "none")
    for step in (2, 4, 6):
        _fake_checkpoint(manager, step, complete=True)
    _fake_checkpoint(manager, 8, complete=False)
    earlier = manager.checkpoint_dir / "superseded" / "global_step6"  # set aside by an earlier mistaken resume
    earlier.mkdir(parents=True)
    assert manager.claim(identity, "global_step4") == "global_step4"
    assert manager.complete_tags() == ["global_step2", "global_step4", "global_step6"]  # until the resume succeeds
    manager.resumed_from("global_step4")
    moved = manager.checkpoint_dir / "superseded" / "global_step6.1"
    assert (moved / COMPLETE_MARKER).is_file() and earlier.is_dir()
    assert f"moved the newer checkpoint global_step6 to {moved}" in capsys.readouterr().out
    assert manager.complete_tags() == ["global_step2", "global_step4"]
    assert (manager.checkpoint_dir / "latest").read_text() == "global_step4"
    manager.save(_FakeEngine(), 5, {}, {})
    assert manager.complete_tags() == ["global_step5"]
    assert (manager.checkpoint_dir / "latest").read_text() == "global_step5"
    assert (moved / COMPLETE_MARKER).is_file()  # pruning never looks inside superseded/


def test_a_save_over_an_existing_tag_is_not_complete_until_it_finishes(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    _fake_checkpoint(manager, 4, complete=True)
    with pytest.raises(OSError, match="disk full"):
        manager.save(_FakeEngine(save_error=OSError("disk full")), 4, {}, {})
    assert manager.complete_tags() == []


def test_a_checkpoint_that_fails_to_load_names_the_other_tags(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (2, 4):
        _fake_checkpoint(manager, step, complete=True)
    missing = FileNotFoundError(2, "No such file or directory", "global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match=r"global_step4 could not be loaded \(FileNotFoundError: .*zero_pp_rank_1"
                                              r".*--resume TAG: global_step2\)"):
        manager.load(_FakeEngine(load_error=missing), "global_step4")


def test_a_directory_with_only_incomplete_checkpoints_is_a_fresh_start(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.claim({"model_args": {"name": "llama-tiny"}}, "none")
    crashed = _fake_checkpoint(manager, 10, complete=False)  # killed during its first save
    manager.claim({"model_args": {"name": "llama-60m"}}, "none")
    assert not crashed.exists()
    assert '"llama-60m"' in (tmp_path / "run.json").read_text()


def test_flops_per_token_counts_every_matmul_weight_once():
    seq_len = 64
    for name in ("llama-tiny", "gpt2-tiny"):
        model = build_model(name, max_seq_len=seq_len)
        spec = MODEL_SPECS[name]
        total = sum(p.numel() for p in model.parameters())
        if spec.family == "llama":  # untied: the input embedding table is the only lookup
            matmul = total - spec.vocab_size * spec.hidden
        else:  # tied wte doubles as the output projection; wpe is a lookup
            matmul = total - seq_len * spec.hidden
        expected = 6 * matmul + 12 * spec.layers * spec.hidden * seq_len
        assert flops_per_token(model, seq_len) == expected


def test_monitors_write_into_the_run_directory(tmp_path):
    base = run_config.read_json(run_config.DS_CONFIG_DIR / "llama-60m.json")
    config = run_config.with_run_monitors(base, tmp_path / "run-a")
    assert config["tensorboard"] == {"enabled": True, "output_path": str(tmp_path / "run-a" / "tensorboard"),
                                     "job_name": "run-a"}
    assert "csv_monitor" not in config  # off unless the config enables it
    with_csv = run_config.with_run_monitors({**base, "csv_monitor": {"enabled": True, "output_path": "/elsewhere"}},
                                            tmp_path / "run-a")
    assert with_csv["csv_monitor"] == {"enabled": True, "output_path": str(tmp_path / "run-a" / "csv"),
                                       "job_name": "run-a"}
