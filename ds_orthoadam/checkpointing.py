"""DeepSpeed checkpoints of a training run: complete-only ``latest``, keep-last-K, exact resume, run identity.

Layout of an output directory::

    run.json                         what this run is (model, attention, optimiser, data, ...): written once
    checkpoints/global_step<N>/      DeepSpeed's files for step N (+ ds_orthoadam_complete.json once complete)
    checkpoints/latest               tag of the newest complete checkpoint (DeepSpeed's own pointer file)
    checkpoints/superseded/<tag>/    newer checkpoints set aside when a run resumed from an older tag (deletable)

Why not ``engine.save_checkpoint(save_latest=True)``: in DeepSpeed 0.19.8 rank 0 writes ``latest`` as soon as *its
own* files are written, before the closing barrier, i.e. possibly while other ranks are still writing their ZeRO
optimizer shards; a crash at that moment leaves ``latest`` pointing at a partial checkpoint. Here every rank saves
with ``save_latest=False``, all ranks meet at a barrier, and only then rank 0 writes a completion marker into the tag
directory and atomically replaces ``latest`` (write a temporary file, ``os.replace``). A checkpoint interrupted while
being written therefore never becomes latest; its directory (no marker) is removed when the run resumes.

``client_state`` carries the training step, tokens seen, the run identity and, per rank (gathered, since DeepSpeed
stores client_state from rank 0 only), the data-stream position and RNG states, so that ``--resume auto`` continues
with exactly the batch and random state an uninterrupted run would have had.

Another number of ranks. A checkpoint whose ZeRO 1-3 optimizer state is partitioned over another number of ranks is
converted to DeepSpeed's universal checkpoint (``checkpoints/universal/<tag>``, by rank 0, removed once every rank
has loaded it) and loaded with ``"checkpoint": {"load_universal": true}``: every parameter's fp32 weights, moments
and step are re-partitioned whole. OrthoAdam's state needs nothing more: its master weights and moments are
DeepSpeed's own, in the rotated frame, and its rotations are a function of the recorded spec and each parameter's
name and shape, not of the partitioning. Stage 0 (fp32) keeps the optimizer state whole in the model-states file
and loads as it is.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ds_orthoadam import ds_internals
from ds_orthoadam.errors import UserError, summary

CHECKPOINT_SUBDIR = "checkpoints"
RUN_FILE = "run.json"
COMPLETE_MARKER = "ds_orthoadam_complete.json"
UNIVERSAL_SUBDIR = "universal"  # a conversion for another number of ranks, removed after loading; never a tag
SUPERSEDED_SUBDIR = "superseded"  # checkpoints abandoned by resuming from an older tag; never a tag (TAG_PATTERN)
CLIENT_STATE_KEY = "ds_orthoadam"
TAG_PATTERN = re.compile(r"^global_step(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint directory that cannot be used as asked; the message says why and what to do."""

    rank_specific = True  # a rank's own checkpoint shard can fail to load while the others' do not


def tag_for_step(step: int) -> str:
    return f"global_step{step}"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and, when present, CUDA) generator states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _differing_fields(recorded: dict, identity: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{"data_policy.world_size": (recorded, this run), ...}``: the leaves where ``identity`` differs from the
    recorded one, nested dictionaries followed (a refusal names the fields, not two whole dictionaries)."""
    differences = {}
    for key, value in identity.items():
        old = recorded.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            differences.update(_differing_fields(old, value, f"{prefix}{key}."))
        elif old != value:
            differences[f"{prefix}{key}"] = (old, value)
    return differences


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a list of one element without a process group)."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class CheckpointManager:
    """Saves and resumes DeepSpeed checkpoints under ``output_dir/checkpoints`` for one run."""

    def __init__(self, output_dir: str | os.PathLike, keep_last: int) -> None:
        if keep_last < 1:
            raise CheckpointError(f"--keep-checkpoints must be at least 1, got {keep_last}")
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = self.output_dir / CHECKPOINT_SUBDIR
        self.keep_last = keep_last

    # ------------------------------------------------------------------ inspecting the directory

    def _tag_dirs(self) -> list[tuple[int, Path]]:
        if not self.checkpoint_dir.is_dir():
            return []
        found = []
        for path in self.checkpoint_dir.iterdir():
            match = TAG_PATTERN.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def complete_tags(self) -> list[str]:
        """Tags of complete checkpoints, oldest first."""
        return [path.name for _, path in self._tag_dirs() if (path / COMPLETE_MARKER).is_file()]

    def latest_complete_tag(self) -> str | None:
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def partition_count(self, tag: str) -> int:
        """Ranks over which checkpoint ``tag``'s optimizer state is partitioned (0: not partitioned, ZeRO stage 0)."""
        return ds_internals.checkpoint_partition_count(self.checkpoint_dir / tag)

    def recorded_identity(self) -> dict | None:
        """The identity (``run.json``) of the run whose complete checkpoints the directory holds; None if none."""
        run_file = self.output_dir / RUN_FILE
        if not self.complete_tags() or not run_file.is_file():
            return None
        return self._recorded_identity(run_file)

    def holds_checkpoints(self) -> bool:
        """Whether anything checkpoint-like (ours or a bare DeepSpeed one) is in the output directory."""
        return bool(self._tag_dirs()) or (self.checkpoint_dir / "latest").exists()

    # ------------------------------------------------------------------ run identity

    def claim(self, identity: dict, resume: str) -> str | None:
        """Check that this run may use the output directory; returns the tag to resume from (or None).

        ``resume``: ``none`` (fresh run; refuses a directory that already holds checkpoints), ``auto`` (newest
        complete checkpoint if there is one, else a fresh run) or a tag such as ``global_step1000``. The directory
        must not hold checkpoints of a run with a different identity (model, attention, optimiser, ...). Called on
        every rank; only rank 0 writes.
        """
        run_file = self.output_dir / RUN_FILE
        recorded = self._recorded_identity(run_file) if run_file.is_file() else None
        if self.holds_checkpoints() and recorded is None:
            raise CheckpointError(f"{self.output_dir} holds checkpoints but no {RUN_FILE}: they belong to another "
                                  "program or run; choose a new --output-dir")
        # Only complete checkpoints are worth protecting: incomplete ones are removed below anyway.
        has_checkpoints = bool(self.complete_tags())
        if has_checkpoints:
            differences = _differing_fields(recorded, identity)
            if differences:
                listed = "; ".join(f"{key}: checkpoint has {old!r}, this run {new!r}"
                                   for key, (old, new) in differences.items())
                raise CheckpointError(f"{self.output_dir} holds checkpoints of another run ({listed}); choose a new "
                                      "--output-dir or repeat the original run's settings to resume it")
            if resume == "none":
                raise CheckpointError(f"{self.output_dir} already holds checkpoints ({self.latest_complete_tag()} is "
                                      "the newest complete one); pass --resume auto to continue it or choose a new "
                                      "--output-dir")
        tag = self._resume_tag(resume)
        _barrier()  # everyone has read the directory before rank 0 changes it
        if _is_rank0():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if not has_checkpoints:  # a run that never completed its first checkpoint leaves nothing to protect
                _atomic_write(run_file, json.dumps(identity, indent=2, sort_keys=True) + "\n")
            self._remove_incomplete()
        _barrier()
        return tag

    @staticmethod
    def _recorded_identity(run_file: Path) -> dict:
        try:
            recorded = json.loads(run_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{run_file} is not valid JSON ({summary(error)}): restore it from a copy (it "
                                  "records the run's settings, checked on resume) or choose a new --output-dir"
                                  ) from error
        if not isinstance(recorded, dict):
            raise CheckpointError(f"{run_file} does not hold a JSON object: restore it from a copy or choose a new "
                                  "--output-dir")
        return recorded

    def resumed_from(self, tag: str) -> None:
        """Make ``tag`` this run's current checkpoint once every rank has resumed from it; collective.

        Newer complete checkpoints are set aside (:meth:`_supersede_newer_than`) and ``latest`` points at ``tag``.
        Only now, not when the tag is chosen: a resume that fails (a missing shard, a config error, other data) must
        leave the directory as it was, the newer checkpoints included.
        """
        _barrier()  # a rank that failed to resume never gets here, and neither do the others
        if _is_rank0():
            self._supersede_newer_than(tag)
            _atomic_write(self.checkpoint_dir / "latest", tag)
        _barrier()

    def _resume_tag(self, resume: str) -> str | None:
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest_complete_tag()
        if resume not in self.complete_tags():
            raise CheckpointError(f"--resume {resume!r}: no complete checkpoint of that name in {self.checkpoint_dir} "
                                  f"(complete: {', '.join(self.complete_tags()) or 'none'}); use auto, none or one of "
                                  "those tags")
        return resume

    def _remove_incomplete(self) -> None:
        """Delete tag directories without a completion marker: saves that were interrupted (never loadable); and a
        universal conversion left by a run that stopped before loading it."""
        universal = self.checkpoint_dir / UNIVERSAL_SUBDIR
        if universal.is_dir():
            print(f"[checkpoint] removing {universal} (a conversion for another number of ranks, left by a run that "
                  "stopped while loading it)", flush=True)
            shutil.rmtree(universal)
        for _, path in self._tag_dirs():
            if not (path / COMPLETE_MARKER).is_file():
                print(f"[checkpoint] removing incomplete checkpoint {path} (its save was interrupted)", flush=True)
                shutil.rmtree(path)

    def _supersede_newer_than(self, tag: str) -> None:
        """Move complete checkpoints newer than ``tag`` (the one this run resumes from) to ``superseded/``.

        Resuming from an older tag abandons the newer ones: left in place, they would outrank this run's own
        checkpoints (keep-last pruning, ``latest``, the export, the next ``--resume auto``). They are moved, not
        deleted, because a mistaken ``--resume`` must not destroy the work they hold.
        """
        step = int(TAG_PATTERN.match(tag).group(1))
        superseded = self.checkpoint_dir / SUPERSEDED_SUBDIR
        for newer_step, path in self._tag_dirs():
            if newer_step <= step or not (path / COMPLETE_MARKER).is_file():
                continue
            superseded.mkdir(exist_ok=True)
            target, suffix = superseded / path.name, 1
            while target.exists():
                target, suffix = superseded / f"{path.name}.{suffix}", suffix + 1
            path.rename(target)
            print(f"[checkpoint] resuming from {tag}: moved the newer checkpoint {path.name} to {target} (no longer "
                  "part of this run; delete it if you do not need it)", flush=True)

    # ------------------------------------------------------------------ save / load

    def save(self, engine, step: int, shared_state: dict, rank_state: dict) -> str:
        """Save a complete checkpoint of ``engine`` at ``step``; collective (every rank must call it).

        ``shared_state`` is the same on every rank (step, tokens, run identity); ``rank_state`` differs per rank
        (data position, RNG) and is gathered so that each rank gets its own back on resume.
        """
        tag = tag_for_step(step)
        client_state = {CLIENT_STATE_KEY: {**shared_state, "per_rank": _gather(rank_state)},
                        **ds_internals.universal_checkpoint_info()}  # convertible by ds_to_universal
        if _is_rank0():  # a tag saved again is invisible until the new save completes (not complete with old files)
            (self.checkpoint_dir / tag / COMPLETE_MARKER).unlink(missing_ok=True)
        _barrier()
        engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state=client_state, save_latest=False)
        _barrier()  # every rank's files are on disk: only now may the checkpoint become visible
        if _is_rank0():
            tag_dir = self.checkpoint_dir / tag
            _atomic_write(tag_dir / COMPLETE_MARKER, json.dumps({"step": step}) + "\n")
            _atomic_write(self.checkpoint_dir / "latest", tag)
            for old in self.complete_tags()[:-self.keep_last]:
                shutil.rmtree(self.checkpoint_dir / old)
        _barrier()
        return tag

    def load(self, engine, tag: str, universal: bool = False) -> tuple[dict, list[dict]]:
        """Load checkpoint ``tag`` into ``engine``: (shared state, every saving rank's state, in rank order).

        ``universal``: the engine loads universal checkpoints (:func:`ds_internals.load_universal`) because ``tag``
        was partitioned over another number of ranks; it is converted first (collective)."""
        load_dir = self.checkpoint_dir
        if universal:
            load_dir = self._convert_to_universal(tag)
        try:
            with ds_internals.zero3_universal_load_repaired(engine) if universal else contextlib.nullcontext():
                load_path, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
        except (OSError, RuntimeError, KeyError, AttributeError, TypeError, ValueError, AssertionError) as error:
            # AttributeError & co.: DeepSpeed reading a checkpoint of another layout (e.g. another ZeRO stage)
            others = [other for other in self.complete_tags() if other != tag]
            raise CheckpointError(f"checkpoint {self.checkpoint_dir / tag} could not be loaded ({summary(error)}); "
                                  f"resume from another complete checkpoint (--resume TAG: "
                                  f"{', '.join(others) or 'none'}) or start a new --output-dir") from error
        if universal:
            _barrier()  # every rank has read the conversion
            if _is_rank0():
                shutil.rmtree(load_dir)
        if load_path is None or CLIENT_STATE_KEY not in (client_state or {}):
            raise CheckpointError(f"checkpoint {self.checkpoint_dir / tag} could not be loaded or lacks the trainer "
                                  "state; resume from another tag (--resume TAG) or start a new --output-dir")
        state = dict(client_state[CLIENT_STATE_KEY])
        return state, state.pop("per_rank")

    def _convert_to_universal(self, tag: str) -> Path:
        """``checkpoints/universal``, holding ``tag`` as a universal checkpoint (rank 0 converts; collective). A
        conversion left by an interrupted run is redone: it is derived data, never a checkpoint of its own."""
        root = self.checkpoint_dir / UNIVERSAL_SUBDIR
        if _is_rank0():
            shutil.rmtree(root, ignore_errors=True)
            print(f"[checkpoint] {tag} was saved by {self.partition_count(tag)} ranks: converting it to a DeepSpeed "
                  f"universal checkpoint in {root} (removed once loaded)", flush=True)
            try:
                ds_internals.convert_to_universal(self.checkpoint_dir / tag, root / tag)
            except (OSError, RuntimeError, KeyError, ValueError, AssertionError) as error:
                raise CheckpointError(f"checkpoint {self.checkpoint_dir / tag} could not be converted for another "
                                      f"number of ranks ({summary(error)}); resume it with the number of ranks that "
                                      "saved it") from error
        _barrier()
        return root
