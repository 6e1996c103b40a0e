"""Pre-train a GPT2/Llama model with DeepSpeed: ``deepspeed ... -m ds_orthoadam.train`` or ``ds-orthoadam-train``.

One process per device, started by the deepspeed launcher (or torchrun). The DeepSpeed config (batch, ZeRO stage,
precision, optimiser, LR schedule, TensorBoard) is ``ds_configs/<model>.json`` plus overrides (see
:mod:`ds_orthoadam.run_config`); the attention variant is ``--attention``. Rank 0 prints progress lines and writes
TensorBoard scalars (:mod:`ds_orthoadam.telemetry`); checkpoints are complete-or-invisible and resumable
(:mod:`ds_orthoadam.checkpointing`); the run ends with an evaluation and a Hugging Face export
(:mod:`ds_orthoadam.export`).

Stopping: Ctrl-C / SIGTERM on any rank makes all ranks stop after the current optimiser step, save a checkpoint and
exit with status 130 (a second Ctrl-C abandons the checkpoint being written; it never becomes ``latest``). A
non-finite loss stops the run with status 3 without saving, so the newest checkpoint stays the last good one.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import transformers

import ds_orthoadam  # registers softmax-1 with transformers; initialize() knows OrthoAdam
from ds_orthoadam import ds_internals, run_config
from ds_orthoadam.checkpointing import TAG_PATTERN, CheckpointError, CheckpointManager, rng_state, set_rng_state
from ds_orthoadam.cli import EXIT_BAD_INPUT, integer_at_least, positive_number, report_error, run_main
from ds_orthoadam.data import (DataError, RankBatches, TrainStream, load_tokenizer, resolve_source,
                               validation_batches, validation_source)
from ds_orthoadam.distributed import agree, process_rank, single_process_defaults
from ds_orthoadam.errors import UserError, summary
from ds_orthoadam.evaluation import causal_lm_inputs, validation_loss
from ds_orthoadam.export import export_checkpoint
from ds_orthoadam.models import (ATTENTION_CHOICES, MODEL_SPECS, NORM_CHOICES, build_meta_model, build_model,
                                  build_partitioned_model)
from ds_orthoadam.param_groups import WEIGHT_DECAY_CHOICES, optimizer_groups
from ds_orthoadam.telemetry import Telemetry, flops_per_token, peak_tflops_for_device
from ds_orthoadam.zero_orthoadam import DeepSpeedConfigError

EXIT_NON_FINITE_LOSS = 3
EXIT_INTERRUPTED = 130
EXIT_PEER_FAILED = 1


class ArgumentConflict(UserError, ValueError):
    """Command-line arguments that cannot work with the output directory or its checkpoint (the same on every rank);
    the message names the problem and the fix."""


class TrainingStopped(Exception):
    """Training ended early on purpose; ``exit_code`` tells the launcher why."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ds-orthoadam-train",
        description="Pre-train a GPT2/Llama model (softmax or softmax-1 attention; AdamW or OrthoAdam from the "
                    "DeepSpeed config) on C4 or local text with DeepSpeed. Launch with `deepspeed --num_gpus N "
                    "--module ds_orthoadam.train ...` (see launch/ and `make train-<model>`).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, choices=sorted(MODEL_SPECS), metavar="NAME",
                       help=f"model size: one of {', '.join(sorted(MODEL_SPECS))}")
    model.add_argument("--attention", default="softmax1", choices=ATTENTION_CHOICES,
                       help="attention normalisation: softmax (baseline) or softmax1 (softmax-1)")
    model.add_argument("--norm", default="default", choices=NORM_CHOICES,
                       help="normalisation layers: the family's default or RMSNorm with a single scalar gain")
    model.add_argument("--seq-len", type=integer_at_least(2), default=256,
                       help="training sequence length in tokens (at least 2: one input and one target)")
    model.add_argument("--activation-checkpointing", action="store_true",
                       help="recompute each decoder layer's activations in the backward instead of keeping them "
                            "(less memory, about one more forward per step; what 3B/7B need, docs/training.md)")
    config = parser.add_argument_group("DeepSpeed config")
    config.add_argument("--ds-config", default=None,
                        help="DeepSpeed JSON (default: ds_configs/<model>.json; cpu.json for *-tiny, testbed.json for "
                             "*-testbed)")
    config.add_argument("--optimizer", default=None, choices=("adamw", "orthoadam"),
                        help="optimiser variant: applies ds_configs/variants/<name>.json (default: the config's)")
    config.add_argument("--ds-override", action="append", default=[], metavar="JSON",
                        help="JSON file deep-merged into the config, in order (repeatable)")
    config.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="assignments",
                        help="edit one config value, e.g. --set scheduler.params.total_num_steps=100 (repeatable)")
    config.add_argument("--weight-decay-on", default="matrices", choices=WEIGHT_DECAY_CHOICES,
                        help="parameters the config's weight decay applies to: 'matrices' (linear layers and "
                             "embeddings; norm gains and biases exempt, as in Megatron-LM and nanoGPT) or 'all'")
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True,
                      help="training source: 'c4' (hub), local C4 json(.gz) shards / directory / glob, or .txt files")
    data.add_argument("--val-data", default=None,
                      help="validation source (default: derived from --data: C4's validation split / shards)")
    data.add_argument("--tokenizer", required=True, help="tokenizer.model or Hugging Face tokenizer directory")
    data.add_argument("--val-samples", type=integer_at_least(1), default=1000,
                      help="validation documents evaluated at every --eval-every and at the end (the paper's final "
                           "evaluation uses 100000: ds-orthoadam-analyze on the export)")
    data.add_argument("--data-workers", type=integer_at_least(0), default=0,
                      help="background processes that read and tokenise training data (0: in the training process)")
    data.add_argument("--seed", type=integer_at_least(0), default=0, help="seed for model init and data shuffling")
    schedule = parser.add_argument_group("schedule")
    schedule.add_argument("--train-steps", type=integer_at_least(1), default=None,
                          help="optimiser steps to train to (default: the scheduler's total_num_steps)")
    schedule.add_argument("--log-every", type=integer_at_least(1), default=10,
                          help="steps between progress lines / TensorBoard")
    schedule.add_argument("--eval-every", type=integer_at_least(0), default=1000,
                          help="steps between validations (0: only at the end)")
    schedule.add_argument("--outlier-every", type=integer_at_least(0), default=500,
                          help="steps between outlier telemetry on the probe batch (0: off)")
    schedule.add_argument("--probe-samples", type=integer_at_least(1), default=4,
                          help="sequences in the fixed outlier probe batch")
    schedule.add_argument("--peak-tflops", type=positive_number, default=None,
                          help="peak TFLOP/s per device for the MFU estimate (default: the detected GPU's dense "
                               "fp16/bf16 tensor-core peak, e.g. V100 125, A100 312, H100 989; on a CPU or an "
                               "unlisted GPU MFU is not reported)")
    output = parser.add_argument_group("checkpoints and output")
    output.add_argument("--output-dir", required=True,
                        help="run directory: run.json, checkpoints/, tensorboard/, metrics.jsonl, hf/ "
                             "(must be on a filesystem shared by all nodes)")
    output.add_argument("--checkpoint-every", type=integer_at_least(1), default=1000, help="steps between checkpoints")
    output.add_argument("--keep-checkpoints", type=integer_at_least(1), default=3,
                        help="complete checkpoints kept (newest)")
    output.add_argument("--resume", default="none",
                        help="'none' (fresh run), 'auto' (newest complete checkpoint, if any) or a tag")
    output.add_argument("--export-dir", default=None, help="Hugging Face export directory (default: OUTPUT/hf)")
    output.add_argument("--no-export", action="store_true", help="skip the final Hugging Face export")
    parser.add_argument("--check-only", action="store_true",
                        help="check the arguments, the DeepSpeed config (for WORLD_SIZE ranks), --output-dir, the "
                             "tokenizer and the data sources in this one process, then exit without training (the "
                             "launch scripts run this before they start any rank)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return parser


# ------------------------------------------------------------------------------------------------ set-up


def compose_config(args: argparse.Namespace, world_size: int) -> dict:
    """The run's validated DeepSpeed config, with its monitors pointed at the output directory."""
    base = args.ds_config or run_config.default_ds_config_path(args.model)
    overrides = ([run_config.variant_path(args.optimizer)] if args.optimizer else []) + args.ds_override
    config = run_config.compose_ds_config(base, overrides, args.assignments)
    run_config.validate(config, world_size)
    return run_config.with_run_monitors(config, args.output_dir)


def initialize_engine(model: torch.nn.Module, ds_config: dict, weight_decay_on: str):
    """The DeepSpeed engine for ``model``: ``ds_orthoadam.initialize`` resolves ``"type": "OrthoAdam"`` and passes
    every other optimiser name through to ``deepspeed.initialize``.

    Config values :func:`run_config.validate` cannot judge (what the device supports, DeepSpeed's own value checks)
    fail inside DeepSpeed as ValueError/TypeError/AssertionError (pydantic's ValidationError is a ValueError); they
    become a DeepSpeedConfigError naming the likely field instead of a traceback on every rank."""
    groups = optimizer_groups(model, weight_decay_on)
    try:
        engine, *_ = ds_orthoadam.initialize(model=model, model_parameters=groups, config=ds_config)
    except DeepSpeedConfigError:
        raise
    except (ValueError, TypeError, AssertionError) as error:
        raise DeepSpeedConfigError(run_config.deepspeed_error_message(error, ds_config)) from error
    return engine


def enable_activation_checkpointing(model: transformers.PreTrainedModel) -> None:
    """Checkpoint every decoder layer (transformers' own mechanism), before ``deepspeed.initialize``: the layer's
    activations are recomputed in the backward. Reentrant, because transformers' non-reentrant default fails under
    ZeRO-3 (:data:`ds_orthoadam.ds_internals.ACTIVATION_CHECKPOINTING_KWARGS`); the same at every stage. Under ZeRO-3
    OrthoAdam the recomputation's gather is rotated to theta like any other."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=ds_internals.ACTIVATION_CHECKPOINTING_KWARGS)


def make_train_stream(args: argparse.Namespace, tokenizer, micro_batch: int, rank: int, world_size: int):
    return TrainStream(args.data, tokenizer, args.seq_len, micro_batch, rank, world_size, seed=args.seed,
                       num_workers=args.data_workers)


def make_rank_batches(args: argparse.Namespace, tokenizer, micro_batch: int, accumulation: int, rank: int,
                      world_size: int, data_streams: int) -> RankBatches:
    """This rank's micro-batches in the run's order, laid out for ``data_streams`` ranks (the run's first number)."""
    return RankBatches(lambda stream: make_train_stream(args, tokenizer, micro_batch, stream, data_streams),
                       data_streams, rank, world_size, accumulation)


def recorded_data_streams(checkpoints: CheckpointManager, world_size: int) -> int:
    """The number of data streams of the run whose checkpoints the output directory holds (the ranks it started on:
    ``data_policy.world_size`` in run.json), or ``world_size`` for a new run. A run resumed on another number of ranks
    keeps its data order (:class:`~ds_orthoadam.data.RankBatches`)."""
    try:
        recorded = checkpoints.recorded_identity()
    except CheckpointError as error:
        raise ArgumentConflict(str(error)) from error
    policy = (recorded or {}).get("data_policy")
    return policy.get("world_size", world_size) if isinstance(policy, dict) else world_size


def resumes_on_other_ranks(checkpoints: CheckpointManager, tag: str | None, ds_config: dict, world_size: int) -> bool:
    """Whether checkpoint ``tag``'s optimizer state is partitioned over another number of ranks, so that it is loaded
    as a DeepSpeed universal checkpoint (ZeRO 1-3); refuses the layout that cannot be (bf16 at stage 0)."""
    saved = checkpoints.partition_count(tag) if tag is not None else 0
    if saved in (0, world_size):
        return False  # stage 0 in fp32 keeps the optimizer state whole: it loads on any number of ranks
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ArgumentConflict(f"checkpoint {tag} was saved by {saved} ranks and ZeRO stage {stage} with partitioned "
                               f"optimizer state cannot resume on {world_size}: resume it on {saved} ranks (another "
                               "number of ranks works at ZeRO 1-3 and at stage 0 in fp32)")
    return True


def resolve_validation_source(args: argparse.Namespace):
    """The validation DataSource; errors about an explicit ``--val-data`` name that option (the data package words
    every source error as ``--data``, which would send the user to fix the wrong argument)."""
    try:
        return validation_source(args.data, args.val_data)
    except DataError as error:
        if args.val_data is None:
            raise
        raise type(error)(re.sub(r"--data\b", "--val-data", str(error))) from error


def make_validation_batches(args: argparse.Namespace, tokenizer, micro_batch: int, rank: int, world_size: int):
    """This rank's share of the validation set (the same documents every time; built once, re-iterable)."""
    return validation_batches(resolve_validation_source(args), tokenizer, args.seq_len, micro_batch,
                              num_docs=args.val_samples, rank=rank, world_size=world_size)


def output_dir_message(output_dir: str | os.PathLike, error: OSError) -> str:
    """One line for a run directory that cannot be created or written (a file, below a file, read-only, ...)."""
    return (f"--output-dir {output_dir} cannot be used as the run directory ({summary(error)}); pass a directory "
            "that you can write to, or a new path below one")


def prepare_output_dir(output_dir: str | os.PathLike) -> None:
    """Create the run directory up front (every rank, before any process group), so that an unusable path is one
    error line instead of an OSError traceback on the rank that first writes into it."""
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ArgumentConflict(output_dir_message(output_dir, error)) from error


def check_before_launch(args: argparse.Namespace, world_size: int) -> None:
    """``--check-only``: what every rank would otherwise find alike, found once before any rank starts, so that a
    bad argument or a missing file is one line in a second instead of an error after the launcher has started every
    rank. The data is only located here (its shards exist), not read; a rank's own share is still checked by that
    rank."""
    compose_config(args, world_size)
    prepare_output_dir(args.output_dir)
    load_tokenizer(args.tokenizer)
    resolve_source(args.data)
    resolve_validation_source(args)


def claim_output_dir(checkpoints: CheckpointManager, identity: dict, resume: str) -> str | None:
    """``checkpoints.claim``: the tag to resume from. Its refusals (another run's directory, a wrong --resume) come
    from files every rank reads alike, so they are reported once; a file-system failure happens where rank 0 writes
    (a read-only run directory, a full disk), so rank 0 reports it."""
    try:
        return checkpoints.claim(identity, resume)
    except CheckpointError as error:
        raise ArgumentConflict(str(error)) from error
    except OSError as error:
        raise CheckpointError(output_dir_message(checkpoints.output_dir, error)) from error


def check_resume_reaches(tag: str | None, total_steps: int) -> None:
    """Refuse to resume a checkpoint that is already past the last step: training would do nothing and exit 0.
    A checkpoint exactly at the last step is a finished run, which re-running only exports again."""
    step = int(TAG_PATTERN.match(tag).group(1)) if tag is not None else 0
    if step > total_steps:
        raise ArgumentConflict(f"the checkpoint to resume ({tag}) is at step {step}, past the last step {total_steps} "
                               f"of this run; pass --train-steps {step} (or more) to continue it, or a new "
                               "--output-dir for a shorter run")


def run_identity(args: argparse.Namespace, model_args: dict, ds_config: dict, data_policy: dict) -> dict:
    """What makes two invocations the same run: resuming into a directory requires all of it to match.

    ``data_policy`` (source, BOS/EOS and packing policy, seed, ranks) is recorded so that "first token" means the
    same thing in every analysis of the run.

    ``weight_decay_on`` is recorded only where it is not ``all``: runs recorded before the option existed decayed
    every parameter, so they resume with ``--weight-decay-on all`` (and are refused, naming the field, without it).
    """
    identity = {"model_args": model_args, "optimizer": run_config.optimizer_type(ds_config), "data": args.data,
                "tokenizer": str(args.tokenizer), "data_policy": data_policy}
    if args.weight_decay_on != "all":
        identity["weight_decay_on"] = args.weight_decay_on
    return identity


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag checked between steps; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"[rank {os.environ.get('RANK', 0)}] {signal.Signals(signum).name}: stopping after this step and "
              "saving a checkpoint (Ctrl-C again to abandon it)", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ training


class Trainer:
    """Owns the engine, data and reporting of one run; ``run()`` trains from the current step to the last."""

    def __init__(self, args: argparse.Namespace, ds_config: dict) -> None:
        self.args = args
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.output_dir = Path(args.output_dir)
        self.gradient_accumulation = run_config.gradient_accumulation_steps(ds_config, self.world_size)
        self.micro_batch = ds_config["train_micro_batch_size_per_gpu"]
        _, schedule_total = run_config.scheduler_steps(ds_config)
        self.total_steps = args.train_steps if args.train_steps is not None else schedule_total

        self.tokenizer = load_tokenizer(args.tokenizer)
        self.model_args = dict(name=args.model, attention=args.attention, norm=args.norm,
                               vocab_size=len(self.tokenizer), max_seq_len=args.seq_len,
                               bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.tokenizer.eos_token_id)
        self.checkpoints = CheckpointManager(self.output_dir, args.keep_checkpoints)
        data_streams = recorded_data_streams(self.checkpoints, self.world_size)
        self.stream = make_rank_batches(args, self.tokenizer, self.micro_batch, self.gradient_accumulation, self.rank,
                                        self.world_size, data_streams)
        self.identity = run_identity(args, self.model_args, ds_config, self.stream.policy)
        resume_tag = claim_output_dir(self.checkpoints, self.identity, args.resume)
        check_resume_reaches(resume_tag, self.total_steps)
        self.resharded = resumes_on_other_ranks(self.checkpoints, resume_tag, ds_config, self.world_size)
        if self.resharded:
            ds_config = ds_internals.load_universal(ds_config)

        torch.manual_seed(args.seed)
        # ZeRO-3: the parameters are partitioned from construction on, and every forward is a collective that all
        # ranks join (evaluation, outlier telemetry); the FLOP count reads the shapes of a meta-device twin.
        self.partitioned = run_config.zero_stage(ds_config) == 3
        model = (build_partitioned_model(ds_config, **self.model_args) if self.partitioned
                 else build_model(**self.model_args))
        if args.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.flops_per_token = flops_per_token(build_meta_model(**self.model_args), args.seq_len)
        self.engine = initialize_engine(model, ds_config, args.weight_decay_on)
        self.device = self.engine.device
        self.validation = make_validation_batches(args, self.tokenizer, self.micro_batch, self.rank, self.world_size)
        self.probe_ids = next(iter(self.validation))["input_ids"][:args.probe_samples].to(self.device)
        self.step, self.tokens_seen = 0, 0
        if resume_tag is not None:
            self._resume(resume_tag)
        self.batches = iter(self.stream)
        self.tokens_per_step = ds_config["train_batch_size"] * args.seq_len
        self.telemetry = Telemetry(self.engine, tokens_per_step=self.tokens_per_step,
                                   flops_per_token=self.flops_per_token, peak_tflops=self.peak_tflops(),
                                   world_size=self.world_size, total_steps=self.total_steps, rank=self.rank,
                                   metrics_file=self.output_dir / "metrics.jsonl", collective_forward=self.partitioned)
        self.telemetry.start_at(self.step)  # a resumed run logs steps after the checkpoint once, not twice
        self.stop = StopRequest()
        self.last_saved_step = self.step

    def peak_tflops(self) -> float | None:
        """``--peak-tflops``, else the detected GPU's peak; None (MFU not reported) on a CPU or an unlisted GPU."""
        if self.args.peak_tflops is not None:
            return self.args.peak_tflops
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        peak = peak_tflops_for_device(device_name)
        if peak is None and self.rank == 0:
            print(f"MFU not reported: no known peak TFLOP/s for device '{device_name}' (pass --peak-tflops)",
                  flush=True)
        return peak

    def _resume(self, tag: str) -> None:
        shared, saved = self.checkpoints.load(self.engine, tag, universal=self.resharded)
        self.step, self.tokens_seen = shared["step"], shared["tokens_seen"]
        self.stream.load_state_dict([rank_state["data"] for rank_state in saved])
        # On another number of ranks the random state is rank r's of the saving ranks modulo their number: training
        # draws nothing at random here (no dropout), so this only matters with dropout, which is then not exact.
        set_rng_state(saved[self.rank % len(saved)]["rng"])
        self.checkpoints.resumed_from(tag)
        if self.rank == 0:
            ranks = "" if len(saved) == self.world_size else f" (saved by {len(saved)} ranks, now {self.world_size})"
            print(f"resumed from {self.checkpoints.checkpoint_dir / tag} at step {self.step}{ranks}", flush=True)

    def save(self) -> str:
        shared = {"step": self.step, "tokens_seen": self.tokens_seen, "run": self.identity,
                  "args": vars(self.args)}
        tag = self.checkpoints.save(self.engine, self.step, shared, {"data": self.stream.state_dict(),
                                                                     "rng": rng_state()})
        self.last_saved_step = self.step
        self.telemetry.print(f"step {self.step:>6}/{self.total_steps} | saved checkpoint {tag}")
        return tag

    def train_step(self, logged: bool) -> float:
        """One optimiser step (all micro-batches of it); returns this rank's mean micro-batch loss. ``logged``: the
        step will be logged (telemetry then reads what it needs before the optimiser step)."""
        losses = []
        for micro in range(self.gradient_accumulation):
            loss = self.engine(**causal_lm_inputs(next(self.batches), self.device)).loss
            self.engine.backward(loss)
            if logged and micro == self.gradient_accumulation - 1:
                self.telemetry.before_optimizer_step()
            self.engine.step()  # DeepSpeed only steps the optimiser at the accumulation boundary
            losses.append(loss.detach().float())
        return float(torch.stack(losses).mean())

    def run(self) -> None:
        self.telemetry.print(f"training {self.args.model} ({self.args.attention}, "
                             f"{self.identity['optimizer']}) on {self.world_size} rank(s): steps {self.step + 1}.."
                             f"{self.total_steps}, {self.tokens_per_step:,} tokens/step, "
                             f"accumulation {self.gradient_accumulation}"
                             f"{', activation checkpointing' if self.args.activation_checkpointing else ''}, "
                             f"output {self.output_dir}")
        frame = getattr(self.engine, "orthoadam_frame", None)
        if frame is not None:
            self.telemetry.print(frame.summary())
        args = self.args
        while self.step < self.total_steps:
            logged = (self.step + 1) % args.log_every == 0
            local_loss = self.train_step(logged)
            loss_sum, stop_votes = agree([local_loss, float(self.stop.requested)], self.device)
            loss = loss_sum / self.world_size
            self.step += 1
            self.tokens_seen += self.tokens_per_step
            if not math.isfinite(loss):
                raise TrainingStopped(f"loss is {loss} at step {self.step}: training stopped without saving; the "
                                      f"newest checkpoint ({self.checkpoints.latest_complete_tag()}) is the last good "
                                      "one (lower the learning rate or check the data, then --resume auto)",
                                      EXIT_NON_FINITE_LOSS)
            self.telemetry.train_step(self.step, loss, log=logged)
            paused = time.perf_counter()
            if args.eval_every and self.step % args.eval_every == 0 and self.step < self.total_steps:
                self.evaluate()
            if args.outlier_every and self.step % args.outlier_every == 0:
                self.telemetry.outliers(self.step, self.engine.module, self.probe_ids)
            if stop_votes > 0:
                self.save()
                raise TrainingStopped(f"stopped by a signal at step {self.step}; checkpoint saved, continue with "
                                      "--resume auto", EXIT_INTERRUPTED)
            if self.step % args.checkpoint_every == 0:
                self.save()
            self.telemetry.exclude_pause(time.perf_counter() - paused)
        if self.last_saved_step != self.step:
            self.save()

    def evaluate(self) -> float:
        loss = validation_loss(self.engine.module, self.validation, self.device, collective=self.partitioned)
        self.telemetry.validation(self.step, loss)
        return loss

    def finish(self) -> None:
        """Final evaluation, outlier telemetry and (rank 0) Hugging Face export of the newest checkpoint.

        Re-running a finished run (``--resume auto`` at the last step) only exports again: the final evaluation is
        already in its logs (TensorBoard and metrics.jsonl keep step S on resume, so it would appear twice)."""
        already_logged = agree([float(self.telemetry.logged(self.step, "Val/loss"))], self.device)[0] > 0
        if already_logged:
            self.telemetry.print(f"step {self.step:>6}/{self.total_steps} | the run was already complete: its final "
                                 "evaluation is in the logs; exporting only")
        else:
            self.evaluate()
            if self.args.outlier_every and self.step % self.args.outlier_every:  # else the loop just measured them
                self.telemetry.outliers(self.step, self.engine.module, self.probe_ids)
        if not self.args.no_export and self.rank == 0:
            export_dir = Path(self.args.export_dir or self.output_dir / "hf")
            tag = self.checkpoints.latest_complete_tag()
            export_checkpoint(self.checkpoints.checkpoint_dir, tag, self.engine.module.config, self.tokenizer,
                              export_dir)
            print(f"exported {tag} to {export_dir}", flush=True)
        dist.barrier()


def quiet_other_ranks(rank: int) -> None:
    """Let rank 0 alone print library warnings (each rank would repeat them), and drop a torch deprecation notice
    that DeepSpeed's ZeRO all-gather triggers on every step."""
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")
    if rank != 0:
        deepspeed.utils.logger.setLevel(logging.ERROR)
        transformers.utils.logging.set_verbosity_error()


def _fail_everywhere(message: str, exit_code: int) -> int:
    """Report an error every rank hits alike once, on rank 0."""
    return report_error(message, exit_code) if process_rank() == 0 else exit_code


def _fail_here(message: str, exit_code: int) -> int:
    """Report an error of this rank, on this rank: the others only see a closed connection when it exits, so it
    alone can name the cause. Ranks other than 0 say who they are."""
    rank = process_rank()
    return report_error(message if rank == 0 else f"rank {rank}: {message}", exit_code)


def _fail_user_error(error: UserError) -> int:
    """A :class:`UserError` is reported once (rank 0) when every rank hits it alike, by its rank otherwise."""
    return (_fail_here if error.rank_specific else _fail_everywhere)(str(error), EXIT_BAD_INPUT)


def _lost_peer(error: RuntimeError) -> bool:
    """Whether a collective failed because another rank exited (gloo/NCCL words it as a closed or reset peer)."""
    return re.search(r"Connection (closed|reset) by peer", str(error)) is not None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    single_process_defaults()
    world_size = int(os.environ["WORLD_SIZE"])
    if args.check_only:
        return run_main(lambda: check_before_launch(args, world_size))
    try:
        ds_config = compose_config(args, world_size)
        prepare_output_dir(args.output_dir)
    except UserError as error:
        return _fail_user_error(error)
    quiet_other_ranks(process_rank())
    ds_internals.skip_shm_comm_build()
    deepspeed.init_distributed()
    exit_code = 0
    try:
        trainer = Trainer(args, ds_config)
        trainer.run()
        trainer.finish()
    except UserError as error:
        exit_code = _fail_user_error(error)
    except TrainingStopped as stopped:  # the ranks agreed on it (all-reduce), so all stop alike
        exit_code = _fail_everywhere(str(stopped), stopped.exit_code)
    except RuntimeError as error:
        if not _lost_peer(error):
            raise
        exit_code = _fail_here("lost the connection to another rank, which stopped first: its error is printed "
                               "above", EXIT_PEER_FAILED)
    if exit_code == 0:
        dist.barrier()
    dist.destroy_process_group()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
