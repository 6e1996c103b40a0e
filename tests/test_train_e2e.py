"""End-to-end: the trainer on 2 CPU ranks through the deepspeed launcher (ZeRO-1, fp32, OrthoAdam), a few steps.

One reference run is shared by most tests; a resumed run, an interrupted run and a diverging run are launched
separately. The corpus is synthetic text from a seeded word-level Markov chain (learnable structure, no network).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ds_orthoadam  # noqa: F401
from ds_orthoadam.checkpointing import COMPLETE_MARKER
from ds_orthoadam.data import train_tokenizer
from ds_orthoadam.distributed import free_port
from ds_orthoadam.ds_logging import NOISE
from ds_orthoadam.models import build_model
from ds_orthoadam.telemetry import MFU_TAG, TRAIN_TAGS, VALIDATION_TAGS
from ds_orthoadam.zero_orthoadam import export_fp32_state_dict

pytestmark = pytest.mark.e2e  # this module's runs go through the deepspeed launcher on 2 ranks (see pyproject.toml)

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED = Path(sys.executable).with_name("deepspeed")
SEQ_LEN = 32
STEPS = 6


def _markov_text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    syllables, endings = ("ka", "lo", "mi", "ne", "su", "ta", "ri", "po"), ("n", "s", "t", "la", "")
    vocabulary = [start + end for start in syllables for end in endings]
    successors = {w: rng.sample(vocabulary, 3) for w in vocabulary}
    word, out = vocabulary[0], []
    for i in range(words):
        out.append(word + ("." if i % 12 == 11 else ""))
        word = rng.choice(successors[word])
    return " ".join(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    """Plain-text train/validation files (documents are blank-line separated paragraphs) and a BPE tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    train_documents = [_markov_text(seed, 400) for seed in range(100)]
    (root / "train.txt").write_text("\n\n".join(train_documents), encoding="utf-8")
    (root / "val.txt").write_text("\n\n".join(_markov_text(seed, 400) for seed in range(100, 110)), encoding="utf-8")
    train_tokenizer(train_documents, str(root / "tokenizer"), vocab_size=384)
    return {"train": str(root / "train.txt"), "val": str(root / "val.txt"), "tokenizer": str(root / "tokenizer")}


def cpu_fp16_env(supported: bool | None, python_path: list[str]) -> dict[str, str]:
    """PYTHONPATH (``python_path``) and what else makes launched processes see DeepSpeed's CPU accelerator answer
    ``supported`` about fp16 (tests/fp16_on_cpu/sitecustomize.py, which changes nothing where that is the machine's
    own answer: on a CPU with native fp16 the fp16 runs are real and the refusal is the simulated case)."""
    if supported is None:
        return {"PYTHONPATH": os.pathsep.join(python_path)}
    return {"PYTHONPATH": os.pathsep.join([*python_path, str(REPO / "tests" / "fp16_on_cpu")]),
            "DS_ORTHOADAM_CPU_FP16": str(int(supported))}


@pytest.mark.parametrize("supported", [True, False])
def test_launched_processes_see_the_cpu_fp16_answer_asked_for(supported):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", **cpu_fp16_env(supported, [str(REPO)])}
    probe = "from deepspeed.accelerator import get_accelerator; print(bool(get_accelerator().is_fp16_supported()))"
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == [str(supported)], result.stderr[-2000:]


def launch(corpus: dict, output_dir: Path, *extra: str, wait: bool = True, cpu_fp16: bool | None = None,
           ranks: int = 2, program: tuple[str, ...] = ("--module", "ds_orthoadam.train")):
    """Run ds_orthoadam.train on 2 CPU ranks with the deepspeed launcher (in its own session, like a terminal).

    ``cpu_fp16``: what DeepSpeed's CPU accelerator answers about fp16 (:func:`cpu_fp16_env`; None: this machine's
    answer). ``ranks``, ``program``: another number of ranks, another script taking the trainer's arguments."""
    command = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port()), *program,
               "--model", "llama-tiny", "--data", corpus["train"], "--val-data", corpus["val"],
               "--tokenizer", corpus["tokenizer"], "--seq-len", str(SEQ_LEN), "--val-samples", "8",
               "--set", "train_batch_size=8", "--set", "train_micro_batch_size_per_gpu=4",
               "--set", "scheduler.params.warmup_num_steps=2", "--set", f"scheduler.params.total_num_steps={STEPS}",
               "--set", "optimizer.params.lr=0.003", "--output-dir", str(output_dir), *extra]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **cpu_fp16_env(cpu_fp16, [str(REPO)])}
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    if not wait:
        return process
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


def metric_rows(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every metrics.jsonl row holding ``tag``, in file order (repeated steps stay repeated)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row[tag]) for row in rows if tag in row]


def losses(run_dir: Path) -> dict[int, float]:
    return dict(metric_rows(run_dir, "Train/loss"))


def tensorboard_scalars(run_dir: Path):
    """The run's TensorBoard scalars as the EventAccumulator reads them (it honours purge events)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = {path.parent for path in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}
    assert len(event_dirs) == 1
    events = EventAccumulator(str(event_dirs.pop()))
    events.Reload()
    return events


def complete_tags(run_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in (run_dir / "checkpoints").glob(f"*/{COMPLETE_MARKER}"))


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    returncode, output = launch(corpus, run_dir, "--optimizer", "orthoadam", "--train-steps", str(STEPS),
                                "--checkpoint-every", "2",
                                "--keep-checkpoints", "2", "--log-every", "1", "--eval-every", "3",
                                "--outlier-every", "3", "--set", "csv_monitor.enabled=true")
    assert returncode == 0, output
    (run_dir.parent / "reference.log").write_text(output)
    return run_dir


def test_loss_decreases(reference_run):
    trained = losses(reference_run)
    assert sorted(trained) == list(range(1, STEPS + 1))
    assert trained[STEPS] < trained[1] - 0.3


def test_keeps_the_last_complete_checkpoints_and_points_latest_at_the_newest(reference_run):
    assert complete_tags(reference_run) == ["global_step4", "global_step6"]
    assert not (reference_run / "checkpoints" / "global_step2").exists()
    assert (reference_run / "checkpoints" / "latest").read_text() == "global_step6"


def test_resume_continues_with_identical_losses_logged_once(reference_run, corpus, tmp_path):
    """A crash after step 6 (torn last metrics line), resumed from the step-4 checkpoint: steps 5 and 6 are trained
    again with the same losses, and metrics.jsonl and TensorBoard hold every step once."""
    resumed = tmp_path / reference_run.name  # same directory name: same TensorBoard run (job_name)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(reference_run / "run.json", resumed / "run.json")
    shutil.copytree(reference_run / "checkpoints" / "global_step4", resumed / "checkpoints" / "global_step4")
    shutil.copytree(reference_run / "tensorboard", resumed / "tensorboard")
    shutil.copytree(reference_run / "csv", resumed / "csv")
    with open(resumed / "metrics.jsonl", "w") as metrics:
        metrics.write((reference_run / "metrics.jsonl").read_text() + '{"step": 7, "Train/lo')
    loss_csv = resumed / "csv" / resumed.name / "Train_loss.csv"
    with open(loss_csv, "a") as torn:
        torn.write("7,5.1")
    returncode, output = launch(corpus, resumed, "--optimizer", "orthoadam", "--train-steps", str(STEPS),
                                "--resume", "auto", "--no-export", "--outlier-every", "0",
                                "--set", "csv_monitor.enabled=true")
    assert returncode == 0, output
    assert "resumed from" in output and "global_step4 at step 4" in output
    assert f"dropped 1 unparsable line(s) from {resumed / 'metrics.jsonl'}" in output
    reference_losses = losses(reference_run)
    assert metric_rows(resumed, "Train/loss") == sorted(reference_losses.items())
    assert [step for step, _ in metric_rows(resumed, "Val/loss")] == [3, STEPS]  # 3 kept, 6 from the resumed run
    assert [step for step, _ in metric_rows(resumed, "Train/lr")] == [1, 2, 3, 4]  # resumed: --log-every 10
    events = tensorboard_scalars(resumed)
    assert [(e.step, e.value) for e in events.Scalars("Train/loss")] == [
        (step, pytest.approx(loss)) for step, loss in sorted(reference_losses.items())]
    assert [e.step for e in events.Scalars("Train/lr")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("Outliers/first_token_share")] == [3]
    # One purge step for all tags: DeepSpeed's sample-keyed points (8 samples per step) from sample 5 on are hidden
    # too, so only the resumed run's steps 5 and 6 remain (docs/training.md says so).
    assert [e.step for e in events.Scalars("Train/Samples/lr")] == [40, 48]
    # DeepSpeed's csv monitor (in RUN_DIR/csv): one header, every step once, the resumed run's rows for 5 and 6.
    assert loss_csv.read_text().splitlines() == (reference_run / "csv" / reference_run.name /
                                                 "Train_loss.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in loss_csv.read_text().splitlines()] == ["step", "1", "2", "3", "4", "5", "6"]


def test_rerunning_a_finished_run_only_exports_again(reference_run, corpus, tmp_path):
    rerun = tmp_path / reference_run.name
    shutil.copytree(reference_run, rerun)
    shutil.rmtree(rerun / "hf")
    before = (rerun / "metrics.jsonl").read_text()
    returncode, output = launch(corpus, rerun, "--optimizer", "orthoadam", "--train-steps", str(STEPS),
                                "--resume", "auto", "--outlier-every", "3")
    assert returncode == 0, output
    assert "the run was already complete" in output and f"exported global_step{STEPS}" in output
    assert (rerun / "metrics.jsonl").read_text() == before
    assert [e.step for e in tensorboard_scalars(rerun).Scalars("Val/loss")] == [3, STEPS]
    assert (rerun / "hf" / "model.safetensors").exists()


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(reference_run, corpus, tmp_path):
    """--resume global_step4 in a directory that also holds global_step6: step 6 belongs to the abandoned branch, so
    it must neither outrank this run's step 5 (keep-last pruning, latest, export) nor be lost."""
    rerun = tmp_path / reference_run.name
    shutil.copytree(reference_run, rerun)
    returncode, output = launch(corpus, rerun, "--optimizer", "orthoadam", "--train-steps", "5", "--resume",
                                "global_step4", "--keep-checkpoints", "1", "--outlier-every", "0")
    assert returncode == 0, output
    checkpoints = rerun / "checkpoints"
    assert complete_tags(rerun) == ["global_step5"] and (checkpoints / "latest").read_text() == "global_step5"
    assert (checkpoints / "superseded" / "global_step6" / COMPLETE_MARKER).is_file()
    assert "moved the newer checkpoint global_step6" in output
    from safetensors.torch import load_file

    exported = load_file(rerun / "hf" / "model.safetensors")
    module = torch.load(checkpoints / "global_step5" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    assert exported.keys() <= module.keys() and all(torch.equal(exported[k], module[k]) for k in exported)


def test_a_failed_resume_from_an_older_checkpoint_leaves_the_newer_ones_in_place(reference_run, corpus, tmp_path):
    """A resume that fails, here at the engine (a config error) and at the load (a missing shard), must not set the
    newer checkpoints aside or move ``latest``: the directory stays as it was, global_step6 resumable."""
    rerun = tmp_path / reference_run.name
    shutil.copytree(reference_run, rerun)
    checkpoints = rerun / "checkpoints"
    returncode, output = launch(corpus, rerun, "--optimizer", "orthoadam", "--train-steps", "5", "--resume",
                                "global_step4", "--set", "zero_optimization.stage=4")
    assert returncode != 0 and "zero_optimization.stage=4" in output
    (checkpoints / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    returncode, output = launch(corpus, rerun, "--optimizer", "orthoadam", "--train-steps", "5", "--resume",
                                "global_step4")
    assert returncode != 0
    assert complete_tags(rerun) == ["global_step4", "global_step6"] and not (checkpoints / "superseded").exists()
    assert (checkpoints / "latest").read_text() == "global_step6"


def test_resuming_with_other_rotations_is_a_one_line_error(reference_run, corpus, tmp_path):
    rerun = tmp_path / reference_run.name
    shutil.copytree(reference_run, rerun)
    returncode, output = launch(corpus, rerun, "--optimizer", "orthoadam", "--set", "optimizer.params.seed=1",
                                "--resume", "auto", "--no-export")
    assert returncode == 2, output
    assert "error: checkpoint" in output and "set optimizer.params rotation/seed" in output
    assert "Traceback" not in output


def test_an_unknown_optimizer_type_is_a_one_line_error(corpus, tmp_path):
    returncode, output = launch(corpus, tmp_path / "bad", "--set", "optimizer.type=AdamWW", "--no-export")
    assert returncode == 2, output
    assert "error: optimizer.type='AdamWW' is not an optimiser DeepSpeed knows" in output
    assert "Traceback" not in output


def test_an_error_on_rank_1_alone_is_reported_by_rank_1(corpus, tmp_path):
    """One training document: rank 1's share of it is empty. Rank 0 only sees rank 1's connection close; the cause
    must still be in the output, once, from the rank that hit it."""
    single = tmp_path / "single.jsonl"
    single.write_text(json.dumps({"text": _markov_text(0, 400)}) + "\n")
    returncode, output = launch(corpus, tmp_path / "run", "--data", str(single), "--train-steps", "2", "--no-export",
                                "--outlier-every", "0")
    assert returncode != 0, output
    reported = [line for line in output.splitlines() if line.startswith("error: rank 1: ")]
    assert len(reported) == 1 and f"gets no document of {single}" in reported[0], output[-4000:]
    assert "Traceback" not in output  # rank 0's lost connection is one line too


def test_a_missing_tokenizer_every_rank_hits_is_printed_once(corpus, tmp_path):
    """An error that follows from the arguments hits every rank alike: rank 0 alone prints it."""
    returncode, output = launch({**corpus, "tokenizer": str(tmp_path / "no-tokenizer")}, tmp_path / "run",
                                "--no-export")
    assert returncode == 2, output[-4000:]
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "no-tokenizer" in errors[0], output[-4000:]


def test_the_launch_script_reports_a_missing_tokenizer_before_starting_any_rank(corpus, tmp_path):
    """launch/train_single_node.sh (what make train-<model> runs) checks the shared inputs in one process first: the
    error line comes once and the deepspeed launcher, which logs its WORLD INFO DICT when it starts ranks, never
    runs."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "NUM_GPUS": "2", "MASTER_PORT": str(free_port()),
           "VENV": str(Path(sys.executable).parent.parent)}
    result = subprocess.run([str(REPO / "launch" / "train_single_node.sh"), "llama-tiny", "--data", corpus["train"],
                             "--val-data", corpus["val"], "--tokenizer", str(tmp_path / "no-tokenizer"),
                             "--output-dir", str(tmp_path / "run")], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "no-tokenizer" in errors[0], output[-4000:]
    assert "WORLD INFO DICT" not in output and "Traceback" not in output, output[-4000:]


def test_the_start_up_shows_no_deepspeed_noise(reference_run):
    log = (reference_run.parent / "reference.log").read_text()
    assert not [line for line in NOISE if line in log]


def test_fp16_on_a_cpu_is_a_one_line_error_naming_the_cpu_config(corpus, tmp_path):
    """On a CPU without native fp16 (simulated on one with it: the fp16 runs below are real there)."""
    returncode, output = launch(corpus, tmp_path / "fp16", "--ds-config", str(REPO / "ds_configs" / "llama-60m.json"),
                                "--optimizer", "adamw", "--no-export", cpu_fp16=False)
    assert returncode == 2, output[-4000:]
    assert "error: DeepSpeed cannot train in fp16 on this device" in output
    assert "--ds-config ds_configs/cpu.json or --set fp16.enabled=false" in output
    assert "Traceback" not in output


def test_a_missing_val_data_is_named_as_val_data(corpus, tmp_path):
    returncode, output = launch(corpus, tmp_path / "run", "--val-data", str(tmp_path / "nope"), "--no-export")
    assert returncode == 2, output[-4000:]
    assert f"error: --val-data {tmp_path / 'nope'}: no such file or directory" in output, output[-4000:]
    assert "Traceback" not in output


def test_resuming_past_the_requested_last_step_is_refused(corpus, tmp_path):
    run_dir = tmp_path / "run"
    common = ("--no-export", "--outlier-every", "0", "--eval-every", "0")
    returncode, output = launch(corpus, run_dir, "--train-steps", "2", *common)
    assert returncode == 0, output[-4000:]
    returncode, output = launch(corpus, run_dir, "--train-steps", "1", "--resume", "auto", *common)
    assert returncode == 2, output[-4000:]
    assert "the checkpoint to resume (global_step2) is at step 2, past the last step 1" in output
    assert "pass --train-steps 2 (or more)" in output and "Traceback" not in output
    assert complete_tags(run_dir) == ["global_step2"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step2"
    # A refusal every rank reaches alike (the directory already holds checkpoints) is printed once, by rank 0.
    returncode, output = launch(corpus, run_dir, "--train-steps", "2", *common)
    assert returncode == 2, output[-4000:]
    assert [line for line in output.splitlines() if line.startswith("error:")] == [
        f"error: {run_dir} already holds checkpoints (global_step2 is the newest complete one); pass --resume auto to "
        "continue it or choose a new --output-dir"]


def test_tensorboard_event_files_hold_the_listed_tags(reference_run):
    events = tensorboard_scalars(reference_run)
    tags = set(events.Tags()["scalars"])
    assert set(TRAIN_TAGS) | set(VALIDATION_TAGS) | {"Train/Samples/lr"} <= tags
    assert MFU_TAG not in tags  # on a CPU without --peak-tflops
    assert any(tag.startswith("Outliers/") for tag in tags)
    assert [event.step for event in events.Scalars("Train/loss")] == list(range(1, STEPS + 1))
    assert [event.step for event in events.Scalars("Val/loss")] == [3, STEPS]


def test_cpu_progress_lines_omit_mfu(reference_run):
    log = (reference_run.parent / "reference.log").read_text()
    progress = [line for line in log.splitlines() if "tok/s" in line]
    assert len(progress) == STEPS and all("TFLOP/s |" in line and "MFU" not in line for line in progress)
    assert "MFU not reported: no known peak TFLOP/s for device 'cpu' (pass --peak-tflops)" in log
    assert all(MFU_TAG not in row for row in map(json.loads, (reference_run / "metrics.jsonl").open()))


def test_the_log_says_what_orthoadam_rotates(reference_run):
    log = (reference_run.parent / "reference.log").read_text()
    assert "OrthoAdam rotations: hadamard, seed 0, scheme version 2, " in log
    assert " MiB per rank; every axis rotated" in log  # a 384-token vocabulary is below max_rotated_dim


def assert_export_has_the_checkpoints_module_weights(run_dir: Path, tag: str):
    """The Hugging Face export reloads with the logits of the module state DeepSpeed stored in checkpoint ``tag`` (a
    second path to the same weights: under ZeRO-1/2 the export reads the fp32 master partitions, which OrthoAdam keeps
    in its rotated frame, and rotates them back). Returns the reloaded export."""
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    assert exported.config._attn_implementation == "softmax1"
    run = json.loads((run_dir / "run.json").read_text())
    reference = build_model(**run["model_args"]).eval()
    states = torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    reference.load_state_dict(states["module"])
    ids = torch.randint(0, exported.config.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, reference(ids).logits)
    return exported


def test_export_reloads_with_identical_logits(reference_run, corpus):
    from transformers import AutoTokenizer

    assert_export_has_the_checkpoints_module_weights(reference_run, "global_step6")
    text = "kan lot mis nela."
    original = AutoTokenizer.from_pretrained(corpus["tokenizer"])
    assert AutoTokenizer.from_pretrained(reference_run / "hf")(text).input_ids == original(text).input_ids


def test_zero_stage_0_trains_resumes_and_exports(corpus, tmp_path):
    """``--set zero_optimization.stage=0``: no optimizer partition files, OrthoAdam steps the module's own
    parameters (fp32), the export takes the checkpoint's module weights; a resume from step 2 repeats the losses of
    steps 3 and 4 (step 4's depends on the moments restored with the checkpoint)."""
    run_dir = tmp_path / "stage0"
    common = ("--set", "zero_optimization.stage=0", "--checkpoint-every", "2", "--log-every", "1",
              "--outlier-every", "0", "--eval-every", "0", "--train-steps", "4")
    returncode, output = launch(corpus, run_dir, *common)
    assert returncode == 0, output[-4000:]
    assert not list((run_dir / "checkpoints").rglob("*_optim_states.pt"))
    assert_export_has_the_checkpoints_module_weights(run_dir, "global_step4")
    first = losses(run_dir)
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed, ignore=shutil.ignore_patterns("global_step4", "hf", "metrics.jsonl"))
    (resumed / "checkpoints" / "latest").write_text("global_step2")
    returncode, output = launch(corpus, resumed, "--resume", "auto", *common)
    assert returncode == 0, output[-4000:]
    again = losses(resumed)
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        assert again[step] == pytest.approx(first[step], rel=1e-6), step


def test_ctrl_c_saves_a_complete_checkpoint_and_exits_nonzero(corpus, tmp_path):
    run_dir = tmp_path / "interrupted"
    process = launch(corpus, run_dir, "--train-steps", "100000", "--checkpoint-every", "100000", "--no-export",
                     "--outlier-every", "0", "--set", "scheduler.params.total_num_steps=100000", wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 2:
            break
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: every process of the session
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output
    assert "stopped by a signal" in output
    tags = complete_tags(run_dir)
    assert len(tags) == 1 and int(tags[0].removeprefix("global_step")) >= 2, output
    assert (run_dir / "checkpoints" / "latest").read_text() == tags[0]


def launch_script(corpus: dict, output_dir: Path, *extra: str, script: str = "train_single_node.sh",
                  **env_vars: str) -> subprocess.Popen:
    """A launch script (default: launch/train_single_node.sh on 2 ranks) with the arguments of :func:`launch`, as a
    job scheduler starts it: in a session of its own, the signals of the test going to the script's process alone."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "NUM_GPUS": "2",
           "MASTER_PORT": str(free_port()), "VENV": str(Path(sys.executable).parent.parent), **env_vars}
    command = [str(REPO / "launch" / script), "llama-tiny", "--data", corpus["train"],
               "--val-data", corpus["val"], "--tokenizer", corpus["tokenizer"], "--seq-len", str(SEQ_LEN),
               "--val-samples", "8", "--set", "train_batch_size=8", "--set", "train_micro_batch_size_per_gpu=4",
               "--set", "scheduler.params.warmup_num_steps=2", "--set", "scheduler.params.total_num_steps=1000",
               "--set", "optimizer.params.lr=0.003", "--optimizer", "orthoadam", "--log-every", "1",
               "--outlier-every", "0", "--checkpoint-every", "1000", "--no-export", "--output-dir", str(output_dir),
               *extra]
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_sigterm_to_the_launch_script_saves_a_checkpoint_and_resumes_bit_identically(corpus, tmp_path):
    """What SLURM preemption or ``kill`` does: SIGTERM to the launch script alone (not to its process group). The
    script passes it to the ranks, which finish the step, save a complete checkpoint at it and exit 130 (the
    documented status), and so does the script; ``--resume auto`` then continues with exactly the losses of a run
    that was never interrupted. Without the forwarding the signal would kill the script and leave the ranks running."""
    run_dir = tmp_path / "preempted"
    process = launch_script(corpus, run_dir, "--train-steps", "1000")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 2:
            break
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 130, output[-4000:]
    assert "stopped by a signal" in output and "SIGTERM -> training ranks" in output, output[-4000:]
    stopped_at = max(losses(run_dir))
    assert complete_tags(run_dir) == [f"global_step{stopped_at}"], output[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"global_step{stopped_at}"

    resumed = launch_script(corpus, run_dir, "--train-steps", str(stopped_at + 2), "--resume", "auto")
    uninterrupted = launch_script(corpus, tmp_path / "uninterrupted", "--train-steps", str(stopped_at + 2))
    for run in (resumed, uninterrupted):
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output[-4000:]
    assert losses(run_dir) == losses(tmp_path / "uninterrupted")


def test_two_pseudo_nodes_in_per_node_mode_train_like_one_node_with_two_ranks(corpus, tmp_path):
    """launch/train_multi_node.sh with NODE_RANK (DeepSpeed's --no_ssh --node_rank, as launch/slurm.sbatch starts
    it) on two loopback "nodes" of one CPU rank each: the same global batches as one node with 2 ranks, so the same
    losses. Each node's script checks the inputs and starts only its own rank; no ssh is involved."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    nodes = [launch_script(corpus, tmp_path / "two-nodes", "--train-steps", "3", script="train_multi_node.sh",
                           HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank))
             for rank in (0, 1)]
    one_node = launch_script(corpus, tmp_path / "one-node", "--train-steps", "3")
    outputs = []
    for run in (*nodes, one_node):
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output[-4000:]
        outputs.append(output)
    for node_output in outputs[:2]:
        assert "--node_rank" in node_output and "pdsh" not in node_output, node_output[-4000:]
    two_nodes = losses(tmp_path / "two-nodes")
    assert sorted(two_nodes) == [1, 2, 3] and two_nodes == losses(tmp_path / "one-node")


def test_non_finite_loss_stops_without_saving_it(corpus, tmp_path):
    run_dir = tmp_path / "diverged"
    returncode, output = launch(corpus, run_dir, "--train-steps", str(STEPS), "--checkpoint-every", "1",
                                "--no-export", "--outlier-every", "0", "--set", "optimizer.params.lr=1e30")
    assert returncode != 0
    assert "training stopped without saving" in output
    last_finite = max(losses(run_dir))  # the non-finite loss is reported, not recorded
    assert f"at step {last_finite + 1}:" in output
    assert complete_tags(run_dir) == sorted(f"global_step{step}" for step in range(1, last_finite + 1))


def test_on_demand_export_of_an_older_checkpoint(reference_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from ds_orthoadam import export

    assert export.main(["--run-dir", str(reference_run), "--out", str(tmp_path / "latest")]) == 0
    final, again = (load_file(d / "model.safetensors") for d in (reference_run / "hf", tmp_path / "latest"))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    assert export.main(["--run-dir", str(reference_run), "--tag", "global_step4", "--out", str(tmp_path / "s4")]) == 0
    older = load_file(tmp_path / "s4" / "model.safetensors")
    assert any(not torch.equal(final[k], older[k]) for k in final)
    assert export.main(["--run-dir", str(reference_run), "--tag", "global_step2", "--out", str(tmp_path / "x")]) == 2
    assert "no complete checkpoint global_step2" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------ fp16

FP16_SCALE_POWER = 17  # one power too high for these gradients: with hysteresis 2, steps 1 and 2 overflow


@pytest.fixture(scope="module")
def fp16_run(corpus, tmp_path_factory) -> Path:
    """The GPU configs' fp16 settings (ds_configs/llama-60m.json: dynamic loss scaling, hysteresis 2) with DeepSpeed's
    own fp16 machinery on the CPU, starting at a loss scale that overflows."""
    run_dir = tmp_path_factory.mktemp("fp16") / "fp16"
    returncode, output = launch(corpus, run_dir, "--ds-config", str(REPO / "ds_configs" / "llama-60m.json"),
                                "--set", f"fp16.initial_scale_power={FP16_SCALE_POWER}", "--optimizer", "orthoadam",
                                "--train-steps", str(STEPS), "--checkpoint-every", "1",
                                "--keep-checkpoints", str(STEPS), "--log-every", "1", "--eval-every", "3",
                                "--outlier-every", "0", cpu_fp16=True)
    assert returncode == 0, output
    (run_dir.parent / "fp16.log").write_text(output)
    return run_dir


def test_fp16_overflow_steps_are_skipped_reported_and_training_goes_on(fp16_run):
    scale = 2.0 ** FP16_SCALE_POWER
    # Hysteresis 2: the first overflow keeps the scale, the second halves it, after which every step is applied.
    skipped = [(1, 1.0), (2, 2.0)] + [(step, 2.0) for step in range(3, STEPS + 1)]
    assert metric_rows(fp16_run, "Train/skipped_steps") == skipped
    assert metric_rows(fp16_run, "Train/loss_scale") == [(1, scale)] + [(s, scale / 2) for s in range(2, STEPS + 1)]
    validation = dict(metric_rows(fp16_run, "Val/loss"))
    assert validation[STEPS] < validation[3] - 0.3
    log = (fp16_run.parent / "fp16.log").read_text()
    assert f"scale {scale:.0f} skipped 1" in log and f"scale {scale / 2:.0f} skipped 2" in log
    assert {"Train/loss_scale", "Train/skipped_steps"} <= set(tensorboard_scalars(fp16_run).Tags()["scalars"])


def fp16_optimizer_partition(run_dir: Path, step: int, rank: int) -> dict:
    """DeepSpeed's ZeRO-1 optimizer record of ``rank`` in checkpoint ``global_step<step>``."""
    path = run_dir / "checkpoints" / f"global_step{step}" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]


def test_fp16_skipped_steps_change_no_weight_moment_or_step_count(fp16_run):
    """Steps 1 and 2 overflow and are skipped: after them the module still holds the initial weights (rebuilt here
    from the recorded model arguments and seed), the fp32 master partitions (rotated frame) are the same after both
    and un-rotate to those weights, and the inner optimiser has no moments and no step count. Step 3 is its first
    step; the loss-scale history in TensorBoard is the one the trainer logged. (These skips fall in the warm-up's
    learning rate 0, so the moments and step count are what they would have changed; a skip at a learning rate that
    moves weights is tests/test_zero_orthoadam.py's ``overflow7`` case.)"""

    run = json.loads((fp16_run / "run.json").read_text())
    torch.manual_seed(0)  # the trainer's --seed
    initial = build_model(**run["model_args"]).half().state_dict()
    for step in (1, 2):
        module = torch.load(fp16_run / "checkpoints" / f"global_step{step}" / "mp_rank_00_model_states.pt",
                            map_location="cpu", weights_only=False)["module"]
        assert module.keys() == initial.keys() and all(torch.equal(module[k], initial[k]) for k in initial), step
    master = export_fp32_state_dict(str(fp16_run / "checkpoints"), "global_step1")
    for name, weight in master.items():
        assert (weight - initial[name].float()).abs().max().item() <= 2 * 2.0**-10 * weight.abs().max().item(), name
    for rank in (0, 1):
        first, second, third, fourth, fifth, last = (fp16_optimizer_partition(fp16_run, step, rank)
                                                     for step in (1, 2, 3, 4, 5, STEPS))
        assert first["base_optimizer_state"]["state"] == {} and second["base_optimizer_state"]["state"] == {}
        assert all(torch.equal(a, b) for a, b in zip(first["single_partition_of_fp32_groups"],
                                                     second["single_partition_of_fp32_groups"], strict=True))
        # Step 3 is the first applied one: it makes moments. Steps 3 and 4 run at the warm-up's learning rate 0
        # (DeepSpeed's scheduler only advances on applied steps), so the master first moves at step 5.
        # One flat partition and one moment state per parameter group (decayed matrices, exempt gains).
        groups = len(third["single_partition_of_fp32_groups"])
        moments = list(third["base_optimizer_state"]["state"].values())
        assert groups == 2 and len(moments) == groups
        assert all(float(state["step"]) == 1.0 and state["exp_avg"].abs().max() > 0 for state in moments)
        assert not torch.equal(fifth["single_partition_of_fp32_groups"][0],
                               fourth["single_partition_of_fp32_groups"][0])
        last_steps = [float(state["step"]) for state in last["base_optimizer_state"]["state"].values()]
        assert last_steps == [STEPS - 2.0] * groups
    events = tensorboard_scalars(fp16_run)
    assert [(e.step, e.value) for e in events.Scalars("Train/loss_scale")] == metric_rows(fp16_run, "Train/loss_scale")


def test_fp16_resume_restores_the_loss_scaler_and_continues_identically(fp16_run, corpus, tmp_path):
    resumed = tmp_path / fp16_run.name
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(fp16_run / "run.json", resumed / "run.json")
    shutil.copytree(fp16_run / "checkpoints" / "global_step4", resumed / "checkpoints" / "global_step4")
    returncode, output = launch(corpus, resumed, "--ds-config", str(REPO / "ds_configs" / "llama-60m.json"),
                                "--set", f"fp16.initial_scale_power={FP16_SCALE_POWER}", "--optimizer", "orthoadam",
                                "--train-steps", str(STEPS), "--resume", "auto", "--no-export", "--log-every", "1",
                                "--outlier-every", "0", cpu_fp16=True)
    assert returncode == 0, output
    for tag in ("Train/loss", "Train/loss_scale", "Train/skipped_steps"):
        assert metric_rows(resumed, tag) == metric_rows(fp16_run, tag)[4:], tag


def test_fp16_export_holds_the_real_weights(fp16_run):
    """The export un-rotates the fp32 master partitions. Second path to the same weights: the checkpoint's fp16
    module, which the engine un-rotates from the fp16 copy of the master that DeepSpeed all-gathers, so it carries
    two fp16 roundings: within 2 ulp of fp16 at each tensor's largest magnitude (a rotated frame would be off by the
    weights' own size)."""
    from safetensors.torch import load_file

    exported = load_file(fp16_run / "hf" / "model.safetensors")
    states = torch.load(fp16_run / "checkpoints" / f"global_step{STEPS}" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    assert states["model.embed_tokens.weight"].dtype == torch.float16
    for name, weight in exported.items():
        two_ulp = 2 * 2.0**-10 * weight.abs().max().item()
        assert (weight - states[name].float()).abs().max().item() <= two_ulp, name


def test_make_train_target_trains_a_size_with_its_gpu_config(corpus, tmp_path):
    """What the README tells GPU users to type -- ``make train-llama-60m`` (launch/train_single_node.sh, the size's
    ds_configs/llama-60m.json: ZeRO-1, fp16, OrthoAdam + softmax-1) -- on 2 CPU ranks, shortened to 2 steps."""
    run_dir = tmp_path / "make-run"
    train_args = (f"--val-data {corpus['val']} --val-samples 4 --seq-len 32 --train-steps 2 --no-export "
                  "--log-every 1 --outlier-every 0 --set train_batch_size=8 --set train_micro_batch_size_per_gpu=4")
    venv = Path(sys.executable).parent.parent  # this environment, taken as set up (-o: never re-installed)
    command = ["make", "--no-print-directory", "-o", f"{venv}/.installed", "train-llama-60m", "NUM_GPUS=2",
               f"VENV={venv}", f"TRAIN_DATA={corpus['train']}", f"TRAIN_TOKENIZER={corpus['tokenizer']}",
               f"RUN_DIR={run_dir}", f"TRAIN_ARGS={train_args}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "MASTER_PORT": str(free_port()), **cpu_fp16_env(True, [])}
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "launch/train_single_node.sh llama-60m --attention softmax1 --optimizer orthoadam" in output
    run = json.loads((run_dir / "run.json").read_text())
    assert run["model_args"]["name"] == "llama-60m" and run["optimizer"] == "OrthoAdam"
    assert metric_rows(run_dir, "Train/loss_scale") == [(1, 65536.0), (2, 65536.0)]  # the config's 2^16
    assert complete_tags(run_dir) == ["global_step2"]


def _multi_node_script(env_overrides: dict, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "VENV": str(Path(sys.executable).parent.parent), **env_overrides}
    return subprocess.run([str(REPO / "launch" / "train_multi_node.sh"), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def keep_deepspeed_env():
    """The multi-node script writes REPO/.deepspeed_env: put back whatever was there."""
    path = REPO / ".deepspeed_env"
    saved = path.read_bytes() if path.exists() else None
    yield path
    if saved is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(saved)


def test_multi_node_script_checks_its_settings_before_launching(tmp_path, keep_deepspeed_env):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    missing = {"HOSTFILE": "", "MASTER_ADDR": "127.0.0.1"}
    assert "set HOSTFILE to a deepspeed hostfile" in _multi_node_script(missing, "llama-tiny").stderr
    no_master = {"HOSTFILE": str(hostfile), "MASTER_ADDR": ""}
    assert "set MASTER_ADDR" in _multi_node_script(no_master, "llama-tiny").stderr
    absent = _multi_node_script({"HOSTFILE": str(tmp_path / "nope"), "MASTER_ADDR": "127.0.0.1"}, "llama-tiny")
    assert absent.returncode == 2 and f"hostfile {tmp_path / 'nope'} does not exist" in absent.stderr
    usage = _multi_node_script({"HOSTFILE": str(hostfile), "MASTER_ADDR": "127.0.0.1"})
    assert usage.returncode == 2 and usage.stderr.startswith("usage:")


def test_multi_node_script_launches_from_a_hostfile_in_the_callers_directory(corpus, tmp_path, keep_deepspeed_env):
    """One host (localhost, 2 CPU slots) without the ssh check: the hostfile launch path and .deepspeed_env, started
    outside the repository with relative paths, which must mean what they mean in that directory."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    data = {name: os.path.relpath(path, tmp_path) for name, path in corpus.items()}
    result = _multi_node_script(
        {"HOSTFILE": "hostfile", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
         "DS_LAUNCHER_ARGS": "--no_ssh_check", "DS_ENV_VARS": "HF_HUB_OFFLINE OMP_NUM_THREADS UNSET_VARIABLE"},
        "llama-tiny", "--data", data["train"], "--val-data", data["val"], "--tokenizer", data["tokenizer"],
        "--seq-len", str(SEQ_LEN), "--val-samples", "4", "--train-steps", "2", "--no-export", "--outlier-every", "0",
        "--set", "train_batch_size=8", "--set", "train_micro_batch_size_per_gpu=4", "--output-dir", "multi",
        cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert keep_deepspeed_env.read_text() == "HF_HUB_OFFLINE=1\nOMP_NUM_THREADS=1\n"
    assert "on 2 rank(s)" in result.stdout and complete_tags(tmp_path / "multi") == ["global_step2"]
    assert not (REPO / "multi").exists()


def test_multi_node_script_over_ssh_runs_the_launcher_on_every_host_through_pdsh(corpus, tmp_path,
                                                                                 keep_deepspeed_env):
    """Two hosts, no ssh server: a fake ``pdsh`` on PATH records what DeepSpeed's runner would execute on them. The
    command reaches both hosts, exports .deepspeed_env's variables, runs launch.py with each host's node rank, the
    master address and port, in the caller's directory, and then the trainer with the script's arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "pdsh.txt"
    (bin_dir / "pdsh").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
    (bin_dir / "pdsh").chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    result = _multi_node_script(
        {"HOSTFILE": str(hostfile), "MASTER_ADDR": "node-a", "MASTER_PORT": "29612",
         "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DS_LAUNCHER_ARGS": "--no_ssh_check",
         "DS_ENV_VARS": "HF_HUB_OFFLINE"},
        "llama-tiny", "--data", corpus["train"], "--val-data", corpus["val"], "--tokenizer", corpus["tokenizer"],
        "--set", "train_batch_size=8", "--set", "train_micro_batch_size_per_gpu=4", "--output-dir", "shared-run",
        cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    arguments = record.read_text().splitlines()
    assert arguments[arguments.index("-w") + 1] == "node-a,node-b"
    remote = " ".join(arguments[arguments.index("-w") + 2:])
    assert "export HF_HUB_OFFLINE=1;" in remote and f"cd {tmp_path};" in remote
    assert "-m deepspeed.launcher.launch" in remote and "--node_rank=%n" in remote
    assert "--master_addr=node-a" in remote and "--master_port=29612" in remote
    assert " --module " in remote and remote.endswith(f" ds_orthoadam.train --model llama-tiny --data {corpus['train']} --val-data "
                           f"{corpus['val']} --tokenizer {corpus['tokenizer']} --set train_batch_size=8 --set "
                           "train_micro_batch_size_per_gpu=4 --output-dir shared-run"), remote
    assert not (tmp_path / "shared-run" / "checkpoints").exists()  # nothing trained here: pdsh was a recorder


def _rank_processes(launcher: subprocess.Popen) -> list:
    import psutil

    try:
        children = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    ranks = []
    for child in children:
        try:
            if any(argument.startswith("--local_rank=") for argument in child.cmdline()):
                ranks.append(child)
        except psutil.NoSuchProcess:
            pass
    return ranks


def _incomplete_checkpoints(run_dir: Path) -> list[Path]:
    return [tag for tag in (run_dir / "checkpoints").glob("global_step*") if not (tag / COMPLETE_MARKER).exists()]


def _checkpoint_weights(run_dir: Path) -> dict:
    tag = (run_dir / "checkpoints" / "latest").read_text()
    return torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def test_kill_9_chaos_resumes_bit_identically(corpus, tmp_path):
    """SIGKILL one rank (chosen at random, seeded) of a 2-rank ZeRO-1 OrthoAdam fp32 run, four times -- twice while a
    checkpoint is being written (its directory exists, its completion marker not yet), twice between steps -- and
    resume with --resume auto after each. ``latest`` never names an incomplete checkpoint, a half-written one is
    removed (and said so) by the next run, --keep-checkpoints still bounds what is kept, and the final weights and
    every logged loss equal an uninterrupted run's bit for bit."""
    import random

    seed = random.randrange(10**6)
    print(f"chaos seed {seed}")
    rng = random.Random(seed)
    steps, common = 12, ("--optimizer", "orthoadam", "--checkpoint-every", "2", "--keep-checkpoints", "2",
                         "--log-every", "1", "--outlier-every", "0", "--eval-every", "0", "--no-export",
                         "--set", "scheduler.params.total_num_steps=12")
    reference = launch(corpus, tmp_path / "uninterrupted", "--train-steps", str(steps), *common, wait=False)
    run_dir = tmp_path / "chaos"
    kills_in_save, outputs = 0, []
    for moment in ("save", "step", "save", "step"):
        process = launch(corpus, run_dir, "--train-steps", str(steps), "--resume", "auto", *common, wait=False)
        start = len(losses(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
        wait_for = start + rng.randint(1, 2)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if moment == "save" and _incomplete_checkpoints(run_dir):
                break
            if moment == "step" and (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= wait_for:
                break
            time.sleep(0.002)
        ranks = _rank_processes(process)
        assert ranks and process.poll() is None, "the run ended before the kill"
        victim = rng.choice(ranks)
        in_save = bool(_incomplete_checkpoints(run_dir))
        victim.kill()
        output, _ = process.communicate(timeout=300)
        outputs.append(output)
        assert process.returncode != 0
        kills_in_save += in_save and bool(_incomplete_checkpoints(run_dir))
        latest = run_dir / "checkpoints" / "latest"
        assert not latest.exists() or (run_dir / "checkpoints" / latest.read_text() / COMPLETE_MARKER).exists()
    assert kills_in_save >= 1, "no kill landed inside a checkpoint save"
    final = launch(corpus, run_dir, "--train-steps", str(steps), "--resume", "auto", *common, wait=False)
    for run in (final, reference):
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output[-4000:]
        outputs.append(output)
    assert any("removing incomplete checkpoint" in output for output in outputs[1:])
    # every row, in file order: no step lost, none logged twice
    assert metric_rows(run_dir, "Train/loss") == metric_rows(tmp_path / "uninterrupted", "Train/loss")
    assert complete_tags(run_dir) == [f"global_step{steps - 2}", f"global_step{steps}"]
    assert not _incomplete_checkpoints(run_dir)
    chaos, uninterrupted = _checkpoint_weights(run_dir), _checkpoint_weights(tmp_path / "uninterrupted")
    assert chaos.keys() == uninterrupted.keys() and all(torch.equal(chaos[k], uninterrupted[k]) for k in chaos)


def _saved_optimizer_state(tag_dir: Path) -> dict:
    """A checkpoint's optimizer state as :func:`resume_worker.loaded_state` dumps it, read from the files DeepSpeed
    wrote (ZeRO 1/2: every rank's partition, padding removed, concatenated in rank order; ZeRO-3: every parameter
    reassembled from its slices on every rank, :func:`_zero3_whole_groups`)."""
    files = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=lambda f: int(f.name.split("_")[3]))
    if (tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file():
        return {"groups": _zero3_whole_groups(tag_dir, files)}
    model = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
    if not files:
        return {"state": model["optimizer"]["state"], "module": model["module"]}
    return {"groups": _concatenated([_partition_groups(file) for file in files]), "module": model["module"]}


def _zero3_whole_groups(tag_dir: Path, files: list[Path]) -> list[dict]:
    """Per group, the parameters' whole fp32 master and moments one after the other (the layout of one rank): ZeRO-3
    gives each of N ranks ceil(numel / N) elements of every parameter, in the group's order (``param_shapes``)."""
    shapes = torch.load(tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)["param_shapes"]
    ranks = [torch.load(file, weights_only=False)["optimizer_state_dict"] for file in files]
    groups = []
    for group, group_shapes in enumerate(shapes):
        flats = {"fp32": [rank["fp32_flat_groups"][group] for rank in ranks]}
        for key in ("exp_avg", "exp_avg_sq"):
            flats[key] = [rank["optimizer_state_dict"]["state"][group][key] for rank in ranks]
        whole, offset = {key: [] for key in flats}, 0
        for shape in group_shapes.values():
            numel = shape.numel()
            part = -(-numel // len(ranks))
            for key, per_rank in flats.items():
                whole[key].append(torch.cat([flat[offset:offset + part] for flat in per_rank])[:numel])
            offset += part
        groups.append({key: torch.cat(parts) for key, parts in whole.items()}
                      | {"step": ranks[0]["optimizer_state_dict"]["state"][group]["step"]})
    return groups


def _partition_groups(file: Path) -> list[dict]:
    saved = torch.load(file, weights_only=False)["optimizer_state_dict"]
    groups = []
    for i, fp32 in enumerate(saved["single_partition_of_fp32_groups"]):  # saved without its padding
        state = saved["base_optimizer_state"]["state"][i]
        groups.append({"fp32": fp32, "exp_avg": state["exp_avg"][:fp32.numel()],
                       "exp_avg_sq": state["exp_avg_sq"][:fp32.numel()], "step": state["step"]})
    return groups


def _concatenated(ranks: list[list[dict]]) -> list[dict]:
    """Per group: the ranks' partitions joined (the whole flat group) and the step, which every rank holds alike."""
    joined = []
    for parts in zip(*ranks):
        assert len({float(part["step"]) for part in parts}) == 1
        joined.append({key: torch.cat([part[key] for part in parts]) for key in ("fp32", "exp_avg", "exp_avg_sq")}
                      | {"step": parts[0]["step"]})
    return joined


def _loaded_optimizer_state(dump_dir: Path) -> dict:
    ranks = [torch.load(file, weights_only=False) for file in sorted(dump_dir.glob("rank*.pt"))]
    if "state" in ranks[0]:
        return ranks[0]
    module = {"module": ranks[0]["module"]} if "module" in ranks[0] else {}  # ZeRO-3: partitioned, not dumped
    return {"groups": _concatenated([rank["groups"] for rank in ranks]), **module}


def _assert_same_state(loaded, saved, path="state") -> None:
    if isinstance(saved, dict):
        assert loaded.keys() == saved.keys(), path
        for key in saved:
            _assert_same_state(loaded[key], saved[key], f"{path}.{key}")
    elif isinstance(saved, list):
        assert len(loaded) == len(saved), path
        for i, (one, other) in enumerate(zip(loaded, saved)):
            _assert_same_state(one, other, f"{path}[{i}]")
    elif isinstance(saved, torch.Tensor):
        assert torch.equal(torch.as_tensor(loaded), saved), path
    else:
        assert loaded == saved, path


@pytest.mark.parametrize("optimizer, stage, saved_on, resumed_on", [("orthoadam", 1, 2, 1), ("orthoadam", 2, 1, 2),
                                                                    ("adamw", 2, 2, 1), ("adamw", 0, 1, 2),
                                                                    ("orthoadam", 3, 2, 1)])
def test_resume_on_another_number_of_ranks(corpus, tmp_path, optimizer, stage, saved_on, resumed_on):
    """A checkpoint saved by ``saved_on`` ranks resumes on ``resumed_on`` (--resume; ZeRO 1/2 through DeepSpeed's
    universal checkpoint, stage 0 as it is). Right after the load, the optimizer state -- fp32 master (OrthoAdam's
    rotated frame), both moments, step -- and the module's weights equal the saved ones exactly (the loaded
    partitions joined against the saved partitions joined). The continued run then trains on the same global
    batches as the run that kept ``saved_on`` ranks: its losses and final weights match that run's to 1e-5 relative
    (not bitwise: the gradient is summed over ranks and micro-batches in another order, ~1e-7 per step in fp32;
    a batch repeated or skipped moves the loss by ~1e-2)."""
    common = ("--optimizer", optimizer, "--set", f"zero_optimization.stage={stage}", "--train-steps", "4",
              "--checkpoint-every", "2", "--keep-checkpoints", "3", "--log-every", "1", "--eval-every", "0",
              "--outlier-every", "0", "--no-export", "--set", "scheduler.params.total_num_steps=4",
              "--set", "optimizer.params.weight_decay=0.1")  # decayed and exempt groups differ
    kept = tmp_path / "kept"
    returncode, output = launch(corpus, kept, *common, ranks=saved_on)
    assert returncode == 0, output[-4000:]
    resumed, dump = tmp_path / "resumed", tmp_path / "dump"
    shutil.copytree(kept, resumed)
    dump.mkdir()
    returncode, output = launch(corpus, resumed, *common, "--resume", "global_step2", ranks=resumed_on,
                                program=(str(REPO / "tests" / "resume_worker.py"), "--dump", str(dump)))
    assert returncode == 0, output[-4000:]
    assert f"(saved by {saved_on} ranks, now {resumed_on})" in output
    assert ("converting it to a DeepSpeed universal checkpoint" in output) == (stage > 0)
    assert not (resumed / "checkpoints" / "universal").exists()  # the conversion is removed once loaded
    _assert_same_state(_loaded_optimizer_state(dump), _saved_optimizer_state(kept / "checkpoints" / "global_step2"))

    reference, continued = metric_rows(kept, "Train/loss"), metric_rows(resumed, "Train/loss")
    assert [step for step, _ in continued] == [1, 2, 3, 4] and reference[:2] == continued[:2]
    assert [loss for _, loss in continued[2:]] == pytest.approx([loss for _, loss in reference[2:]], rel=1e-5)
    final = [export_fp32_state_dict(str(run / "checkpoints"), "global_step4") for run in (kept, resumed)]  # theta
    for name, weight in final[0].items():
        assert torch.allclose(final[1][name], weight, rtol=1e-5, atol=1e-5 * float(weight.abs().max())), name
