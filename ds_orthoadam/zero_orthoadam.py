"""OrthoAdam inside DeepSpeed, exact under ZeRO stages 0 to 3: ``ds_orthoadam.initialize(...)``.

OrthoAdam with a fixed rotation Q per parameter is exactly AdamW run on phi = Q theta with gradient Q g (decoupled
weight decay and the global gradient norm are rotation invariant). Under ZeRO-1/2 the inner optimiser only sees a
flat slice that cuts across parameters, so the rotation cannot happen inside its ``step()``. Design ("rotated
frame"):

* DeepSpeed's fp32 master weights and its AdamW moments live in the rotated frame phi; DeepSpeed's own ``AdamW``
  (``"type": "OrthoAdam"`` is translated to it) steps them, so sharding, clipping, loss scaling, overflow skips and
  checkpointing are DeepSpeed's unchanged code;
* the gradient is rotated (g -> Q g) before DeepSpeed reduces, partitions and clips it (a linear map commutes with
  accumulation and data-parallel averaging; the norm is invariant), where possible once per optimiser step:
  at ZeRO 0 and at ZeRO 1 without ``overlap_comm`` (gradients accumulated in the parameter dtype), DeepSpeed leaves
  ``p.grad`` to accumulate over the micro-batches and reduces it only in ``engine.allreduce_gradients()`` on the
  boundary micro-batch, so the accumulated ``p.grad`` is rotated in place right before that reduction (a wrapper on
  the engine instance, :func:`ds_orthoadam.ds_internals.run_before_boundary_reduction`); at ZeRO 1 with
  ``overlap_comm`` DeepSpeed reduces the accumulated ``p.grad`` inside the boundary micro-batch's backward, so a
  tensor hook does nothing on earlier micro-batches and, on the boundary one, hands autograd Q(accumulated +
  incoming) with ``p.grad`` cleared; where DeepSpeed takes every micro-batch's gradient during its backward
  (ZeRO-2, ``BF16_Optimizer`` with fp32 accumulation), a tensor hook on every parameter rotates each micro-batch's
  gradient instead (``engine.orthoadam_hooks.rotates_once_per_step`` says which);
* after every *applied* step, DeepSpeed has all-gathered phi into the module's parameters: they are rotated back
  (theta = Q^T phi) in place. A step DeepSpeed skips (fp16 overflow: ``engine.was_step_applied()`` is False) touches
  neither the master weights, the moments, the step count, nor the module, so nothing is rotated.

The module therefore always holds the real weights theta (forward, evaluation, ``engine.module.state_dict()``, the
module weights inside every checkpoint), and the rotations are never stored: they are a pure function of
``(seed, name, shape, kind, max_dense_dim, long_axis, max_rotated_dim)`` (see :mod:`ds_orthoadam.rotations`),
recorded in the checkpoint's ``client_state`` and checked on load. The fp32 weights of a ZeRO checkpoint are in the
rotated frame; :func:`export_fp32_state_dict` returns the real theta.

ZeRO-3 partitions the parameters themselves: no rank holds a whole parameter except while DeepSpeed has gathered
it. There the frame is kept at the partitions: DeepSpeed's bit16/fp32 parameter partitions, its fp32 master and its
moments hold phi, and every gathered (whole) parameter holds theta:

* whenever DeepSpeed completes a gather (forward and backward fetches, prefetches, ``GatheredParameters``, the
  persistent parameters' re-gather after each step), the gathered phi is rotated to theta (into a new tensor: on one
  rank a gather is a view of the partition) before anything reads it (:func:`ds_orthoadam.ds_internals.on_zero3_gather`); whatever gathers whole weights (forward, evaluation,
  ``GatheredParameters``, DeepSpeed's consolidated 16-bit state dict for export) therefore sees theta;
* where DeepSpeed writes a modified whole parameter back into its partition (``GatheredParameters`` with a modifier
  rank), it is rotated to phi first (:func:`ds_orthoadam.ds_internals.before_zero3_write_back`);
* each micro-batch's gradient of the gathered parameter is rotated (g -> Q g) by a tensor hook, before DeepSpeed's
  post-accumulate hook reduce-scatters it; clipping (global norm) and decoupled weight decay are rotation invariant,
  so DeepSpeed's AdamW on the partitions is OrthoAdam;
* at ``initialize`` the partitions DeepSpeed made from theta are rewritten to phi, one parameter at a time, and the
  fp32 master refreshed from them.

ZeRO-3 therefore costs three rotations per parameter per micro-batch (gathered for forward, re-gathered for backward,
gradient), one more per re-gather under activation checkpointing; a persistent (small, never released) parameter is
rotated once per step. ``bench/zero.py`` measures it (docs/deepspeed.md).

Why not the re-parametrisation theta = R(phi) with AdamW on phi (also exact)? It rotates every parameter twice per
*micro-batch* (theta = Q^T phi in forward, Q g in backward, plus again under activation checkpointing), materialises
an extra copy of the weights during forward/backward, renames every weight in the state dict and breaks tied
embeddings. The rotated frame costs one gradient rotation (per optimiser step at ZeRO 0/1, per micro-batch at
ZeRO-2) plus one parameter rotation per optimiser step, and keeps the module untouched: at ZeRO 0/1 that is the two
rotations per step single-process OrthoAdam does anyway, whatever the gradient accumulation. ``bench/zero.py``
measures both routes; the figures are in docs/deepspeed.md ("Why this route, measured").

Everything that relies on DeepSpeed behaviour beyond its public API is in :mod:`ds_orthoadam.ds_internals`.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from ds_orthoadam import ds_internals
from ds_orthoadam import rotations
from ds_orthoadam.errors import UserError
from ds_orthoadam.run_config import is_number
from ds_orthoadam.rotations import Rotation, ScratchBuffers, make_rotation

ORTHOADAM_TYPE = "orthoadam"
ROTATION_STATE_KEY = "ds_orthoadam_rotation"  # in client_state beside the trainer's checkpointing.CLIENT_STATE_KEY
SUPPORTED_ZERO_STAGES = (0, 1, 2, 3)
# ZeRO-3 options that keep or transform a second copy of the partitions outside the gather/write-back path the rotated
# frame follows (hpZ's secondary partitions are cut from gathered, i.e. real-frame, data; quantised weights would be
# gathered as quantised phi): refused, with their defaults, rather than trained in a mixed frame.
_ZERO3_REFUSED = {"zero_hpz_partition_size": 1, "zero_quantized_weights": False,
                  "zero_quantized_nontrainable_weights": False}


class DeepSpeedConfigError(UserError, ValueError):
    """A DeepSpeed config field is invalid for OrthoAdam; the message names the field and the fix."""


class RotationMismatchError(UserError, ValueError):
    """A checkpoint was written with different rotations than the engine loading it."""


@dataclass(frozen=True)
class RotationSpec:
    """What determines every rotation (with each parameter's name and shape), incl. the rotation scheme version."""

    rotation: str = "dense"
    seed: int = 0
    max_dense_dim: int = rotations.DEFAULT_MAX_DENSE_DIM
    long_axis: str = rotations.DEFAULT_LONG_AXIS
    max_rotated_dim: int | None = rotations.DEFAULT_MAX_ROTATED_DIM
    version: int = rotations.ROTATION_VERSION


# Fields a checkpoint's record may lack because the release that wrote it predates them, with the value that
# reproduces what that release did: such a checkpoint resumes in its own frame (a warning says so).
_FIELDS_ADDED_LATER = {"max_rotated_dim": None}


def saved_rotation_spec(record: dict) -> RotationSpec:
    """The :class:`RotationSpec` a checkpoint's rotation record describes (also one written by an older release)."""
    return RotationSpec(**{**_FIELDS_ADDED_LATER, **record})


# --------------------------------------------------------------------------------------------------- config


def _check_number(params: dict, name: str, low: float, high: float | None = None) -> float:
    value = params[name]
    if not is_number(value) or value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise DeepSpeedConfigError(f"optimizer.params.{name} must be a number {bound}, got {value!r}")
    return float(value)


def _check_int(params: dict, name: str, low: int) -> int:
    value = params[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise DeepSpeedConfigError(f"optimizer.params.{name} must be an integer >= {low}, got {value!r}")
    return value


_ADAMW_DEFAULTS = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
_ROTATION_DEFAULTS = {k: v for k, v in asdict(RotationSpec()).items() if k != "version"}  # not a config field


def _parse_orthoadam_params(params: Any) -> tuple[dict, RotationSpec]:
    """Validate ``optimizer.params`` of an OrthoAdam section: (DeepSpeed AdamW params, rotation spec)."""
    if not isinstance(params, dict):
        raise DeepSpeedConfigError(f"optimizer.params must be a JSON object, got {params!r}")
    allowed = set(_ADAMW_DEFAULTS) | set(_ROTATION_DEFAULTS) | {"torch_adam"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise DeepSpeedConfigError(f"optimizer.params.{unknown[0]} is not an OrthoAdam parameter: "
                                   f"use only {', '.join(sorted(allowed))}")
    merged = {**_ADAMW_DEFAULTS, **_ROTATION_DEFAULTS, **params}
    betas = merged["betas"]
    if (not isinstance(betas, (list, tuple)) or len(betas) != 2
            or not all(is_number(b) and 0.0 <= b < 1.0 for b in betas)):
        raise DeepSpeedConfigError(f"optimizer.params.betas must be a list of two numbers in [0, 1), got {betas!r}")
    for field, choices in (("rotation", rotations.ROTATION_KINDS), ("long_axis", rotations.LONG_AXIS_TRANSFORMS)):
        if merged[field] not in choices:
            raise DeepSpeedConfigError(f"optimizer.params.{field} must be one of {', '.join(choices)}, "
                                       f"got {merged[field]!r}")
    torch_adam = merged.get("torch_adam", get_accelerator().device_name() == "cpu")
    if not isinstance(torch_adam, bool):
        raise DeepSpeedConfigError(f"optimizer.params.torch_adam must be true or false, got {torch_adam!r}")
    adamw = {
        "lr": _check_number(merged, "lr", 0.0),
        "betas": [float(b) for b in betas],
        "eps": _check_number(merged, "eps", 0.0),
        "weight_decay": _check_number(merged, "weight_decay", 0.0),
        # FusedAdam on accelerators; torch's AdamW where FusedAdam cannot be built (the CPU accelerator).
        "torch_adam": torch_adam,
    }
    try:
        rotations.check_max_rotated_dim(merged["max_rotated_dim"])
    except rotations.MaxRotatedDimError:
        raise DeepSpeedConfigError("optimizer.params.max_rotated_dim must be an integer >= 1 (longer axes stay "
                                   "unrotated) or null (rotate every axis), got "
                                   f"{merged['max_rotated_dim']!r}") from None
    spec = RotationSpec(merged["rotation"], _check_int(merged, "seed", 0), _check_int(merged, "max_dense_dim", 1),
                        merged["long_axis"], merged["max_rotated_dim"])
    return adamw, spec


def _check_zero_section(config: dict) -> None:
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise DeepSpeedConfigError(f"zero_optimization must be a JSON object, got {zero!r}")
    stage = zero.get("stage", 0)
    if stage not in SUPPORTED_ZERO_STAGES:
        raise DeepSpeedConfigError(
            f"zero_optimization.stage={stage!r} is not a ZeRO stage: use 0, 1, 2 or 3")
    if stage == 3:
        for option, default in _ZERO3_REFUSED.items():
            if zero.get(option, default) != default:
                raise DeepSpeedConfigError(f"zero_optimization.{option}={zero[option]!r} is not supported with "
                                           f"OrthoAdam under ZeRO-3: remove it (default {json.dumps(default)})")
    for offload in ("offload_optimizer", "offload_param"):
        device = (zero.get(offload) or {}).get("device", "none")
        if device not in (None, "none"):
            raise DeepSpeedConfigError(f"zero_optimization.{offload}.device={device!r} is not supported with "
                                       "OrthoAdam: remove the offload section")
    if zero.get("load_from_fp32_weights", True) is not True:
        raise DeepSpeedConfigError("zero_optimization.load_from_fp32_weights=false is not supported with OrthoAdam: "
                                   "the fp32 master weights are in the rotated frame and must be restored from them")


def _check_accumulation(config: dict) -> None:
    if config.get("managed_gradient_accumulation", True) is not True:
        raise DeepSpeedConfigError("managed_gradient_accumulation=false is not supported with OrthoAdam: remove it "
                                   "(the rotations follow DeepSpeed's own gradient accumulation boundaries)")


def resolve_config(config: dict | str) -> tuple[dict, RotationSpec | None]:
    """Translate a DeepSpeed config: ``(config for deepspeed.initialize, rotation spec or None)``.

    ``"optimizer": {"type": "OrthoAdam", "params": {...}}`` becomes DeepSpeed's own ``AdamW`` (stepping the rotated
    frame) plus a :class:`RotationSpec`; any other optimiser name DeepSpeed resolves passes through unchanged (spec
    None). Raises :class:`DeepSpeedConfigError` naming the offending field.
    """
    if isinstance(config, (str, os.PathLike)):
        with open(config, encoding="utf-8") as handle:
            config = json.load(handle)
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")
    section = config.get("optimizer")
    if section is None:
        return config, None
    name = section.get("type") if isinstance(section, dict) else None
    if not isinstance(name, str):
        raise DeepSpeedConfigError(f"optimizer.type must be an optimiser name (e.g. \"OrthoAdam\"), got {name!r}")
    if name.lower() != ORTHOADAM_TYPE:
        if not ds_internals.optimizer_name_resolvable(name):
            raise DeepSpeedConfigError(f"optimizer.type={name!r} is not an optimiser DeepSpeed knows: use "
                                       "\"OrthoAdam\", a DeepSpeed optimiser (AdamW, Adam, Lamb, Lion, ...) or the "
                                       "name of a torch.optim class")
        return config, None
    adamw, spec = _parse_orthoadam_params(section.get("params", {}))
    _check_zero_section(config)
    _check_accumulation(config)
    translated = copy.deepcopy(config)
    translated["optimizer"] = {"type": "AdamW", "params": adamw}
    return translated, spec


# -------------------------------------------------------------------------------------------- rotated frame


def _check_buildable(spec: RotationSpec, source: str) -> None:
    """A checkpoint's recorded rotation scheme version must be one this release builds (RotationMismatchError)."""
    try:
        rotations.check_version(spec.version)
    except rotations.RotationVersionError as error:
        raise RotationMismatchError(f"{source}: {error}") from error


class RotatedFrame:
    """The rotations of a model's trainable parameters, keyed like ``OrthoAdam(model.named_parameters())``."""

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], spec: RotationSpec):
        self.params: dict[str, torch.nn.Parameter] = {n: p for n, p in named_parameters if p.requires_grad}
        self.names: dict[int, str] = {id(p): n for n, p in self.params.items()}
        self.adopt(spec)
        self.scratch = ScratchBuffers()

    def adopt(self, spec: RotationSpec) -> None:
        """(Re)build every rotation for ``spec``; hooks and steps look rotations up when they run, so they follow."""
        self.spec = spec
        self.rotations: dict[str, Rotation] = {
            name: make_rotation(ds_internals.full_shape(p), spec.rotation, spec.seed, name, spec.max_dense_dim,
                                device=p.device, long_axis=spec.long_axis, version=spec.version,
                                max_rotated_dim=spec.max_rotated_dim)
            for name, p in self.params.items()
        }

    @property
    def nbytes(self) -> int:
        """Bytes taken by all rotations (the same on every rank: they are not sharded)."""
        return sum(rotation.nbytes for rotation in self.rotations.values())

    def unrotated_axes(self) -> list[tuple[str, str, int]]:
        """(parameter name, its dims, length) of every axis longer than 1 that the spec leaves unrotated (longer than
        ``max_rotated_dim``, or than ``max_dense_dim`` with ``long_axis="identity"``), in parameter order."""
        spec, found = self.spec, []
        for name, param in self.params.items():
            shape = ds_internals.full_shape(param)
            for axis, size in enumerate(rotations.matrix_view(shape)):
                transform = rotations.axis_kind(spec.rotation, size, spec.max_dense_dim, spec.long_axis,
                                                spec.max_rotated_dim)
                if size > 1 and transform == "identity":
                    dims = f"dim {axis}" if axis == 0 or len(shape) == 2 else f"dims 1-{len(shape) - 1}"
                    found.append((name, dims, size))
        return found

    def summary(self, most: int = 4) -> str:
        """One line for the training log: the rotation settings, how well each axis length mixes
        (:func:`rotations.mixing_by_axis_length`) and the axes left unrotated (the first ``most``)."""
        spec = self.spec
        mixing = ", ".join(f"{size}: {figure:.2f}"
                           for size, figure in rotations.mixing_by_axis_length(self.rotations.values()).items())
        line = (f"OrthoAdam rotations: {spec.rotation}, seed {spec.seed}, scheme version {spec.version}, "
                f"mixing n*sum(q^4) by axis length (Haar ~3, unmixed = n) {mixing or 'none'}, "
                f"{self.nbytes / 2**20:.2f} MiB per rank")
        unrotated = self.unrotated_axes()
        if not unrotated:
            return f"{line}; every axis rotated"
        shown = ", ".join(f"{name} {dims} ({size})" for name, dims, size in unrotated[:most])
        more = f" and {len(unrotated) - most} more" if len(unrotated) > most else ""
        return (f"{line}; left unrotated (max_rotated_dim={spec.max_rotated_dim}, long_axis={spec.long_axis}): "
                f"{shown}{more}")

    def _rotated(self, name: str, tensor: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Q x (or Q^T x) of a parameter-shaped tensor, computed in fp32; the result may live in a scratch buffer
        (valid until the next call)."""
        workspace = self.scratch.get(tensor.numel(), tensor.device, torch.float32)
        rotation = self.rotations[name]
        return (rotation.unrotate if inverse else rotation.rotate)(tensor.float(), workspace)

    @torch.no_grad()
    def rotate_params_(self) -> None:
        """theta -> phi = Q theta, in place (computed in fp32 whatever the parameter dtype)."""
        for name, param in self.params.items():
            param.copy_(self._rotated(name, param))

    @torch.no_grad()
    def unrotate_params_(self) -> None:
        """phi -> theta = Q^T phi, in place."""
        for name, param in self.params.items():
            param.copy_(self._rotated(name, param, inverse=True))

    @torch.no_grad()
    def rotate_param_(self, param: torch.nn.Parameter, inverse: bool = False) -> None:
        """``param.data`` := Q theta (or theta = Q^T phi with ``inverse``) for one of the frame's parameters; others
        are left alone (ZeRO-3's write-back callback sees every parameter of a gathered list)."""
        name = self.names.get(id(param))
        if name is not None:
            # A new tensor, not written into param.data: a gather on one rank hands out a view of the partition.
            rotated = self._rotated(name, param.data, inverse=inverse)
            param.data = rotated.to(param.dtype, copy=self.scratch.holds(rotated))

    @torch.no_grad()
    def rotate_gradients_(self) -> None:
        """g -> Q g in place for every accumulated gradient (parameters that received none are skipped)."""
        for name, param in self.params.items():
            if param.grad is not None:
                param.grad.copy_(self._rotated(name, param.grad))

    def register_gradient_hooks(
        self, at_boundary: Callable[[], bool] | None = None
    ) -> list[torch.utils.hooks.RemovableHandle]:
        """Tensor hooks that hand autograd rotated gradients before DeepSpeed accumulates, reduces or clips them.

        Without ``at_boundary`` every micro-batch's gradient is rotated (Q g). With it (where DeepSpeed lets ``p.grad``
        accumulate locally and reduces it during the boundary micro-batch's backward) earlier micro-batches'
        gradients accumulate unrotated, and on the boundary micro-batch the hook returns Q(accumulated + incoming)
        with ``p.grad`` cleared, so autograd stores exactly the rotated whole-step gradient: one rotation per step.
        """

        def rotate_gradient(name: str, param: torch.nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
            if at_boundary is not None:
                if not at_boundary():
                    return grad
                if param.grad is not None:
                    grad, param.grad = param.grad + grad, None
            rotated = self._rotated(name, grad)
            # Autograd may adopt what a hook returns as p.grad: copied out of a scratch buffer, else returned as is.
            return rotated.to(grad.dtype, copy=self.scratch.holds(rotated))

        return [param.register_hook(functools.partial(rotate_gradient, name, param))
                for name, param in self.params.items()]

    def unrotate_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state dict with every rotated entry mapped back to theta; tied aliases follow their parameter."""
        real: dict[str, torch.Tensor] = dict(state_dict)
        replaced: dict[int, torch.Tensor] = {}
        for name, rotation in self.rotations.items():
            tensor = state_dict[name]
            real[name] = replaced[id(tensor)] = rotation.unrotate(tensor.float())
        for name, tensor in state_dict.items():
            if name not in self.rotations and id(tensor) in replaced:
                real[name] = replaced[id(tensor)]
        return real


# --------------------------------------------------------------------------------------------------- engine


class OrthoAdamEngineHooks:
    """Keeps one DeepSpeed engine's module in the real frame around its step, save and load (see module doc)."""

    def __init__(self, engine: "deepspeed.DeepSpeedEngine", frame: RotatedFrame):
        self.engine = engine
        self.frame = frame
        self.master_copy = ds_internals.optimizer_keeps_master_copy(engine)
        self._gradients_rotated = False
        self.partitions_parameters = engine.zero_optimization_stage() == 3
        if self.partitions_parameters:
            # ZeRO-3 reduce-scatters every micro-batch's gradient during its backward: a tensor hook rotates each.
            if not ds_internals.zero3_reduces_after_tensor_hooks(engine):
                raise DeepSpeedConfigError("compile.deepcompile is not supported with OrthoAdam under ZeRO-3: disable "
                                           "it (DeepCompile replaces the gradient hooks the rotation relies on)")
            self.rotates_before_reduction = self.rotates_once_per_step = False
            self.gradient_hooks = frame.register_gradient_hooks()
            self._keep_partitions_in_rotated_frame()
        else:
            self._init_replicated_parameters()
        self._wrap("save_checkpoint", self.save_checkpoint)
        self._wrap("load_checkpoint", self.load_checkpoint)

    def _keep_partitions_in_rotated_frame(self) -> None:
        """ZeRO-3: partitions (and master) := Q theta once; from then on every gather yields theta and every write-back
        of a whole parameter stores phi (see the module doc)."""
        ds_internals.before_zero3_write_back(self.engine.module.parameters(), self.frame.rotate_param_)
        were_gathered = ds_internals.rewrite_zero3_partitions(self.engine, self.frame.params.values())
        ds_internals.on_zero3_gather(self.frame.params.values(),
                                     functools.partial(self.frame.rotate_param_, inverse=True))
        ds_internals.gather_zero3_params(were_gathered)

    def _init_replicated_parameters(self) -> None:
        """ZeRO 0-2: rotate gradients where DeepSpeed reduces them, step the master in phi, rotate the module back."""
        engine, frame = self.engine, self.frame
        # Where DeepSpeed reduces the gradient accumulated in p.grad only on the boundary micro-batch, that
        # accumulated gradient is rotated once per optimiser step: right before engine.allreduce_gradients (ZeRO 0,
        # ZeRO 1), or by a tensor hook on the boundary micro-batch (ZeRO 1 with overlap_comm, which reduces inside
        # that backward); elsewhere every micro-batch's gradient is rotated by a tensor hook before DeepSpeed takes it.
        self.rotates_before_reduction = ds_internals.reduces_accumulated_grads_at_boundary(engine)
        in_boundary_backward = ds_internals.reduces_accumulated_grads_in_boundary_backward(engine)
        self.rotates_once_per_step = self.rotates_before_reduction or in_boundary_backward
        self.gradient_hooks = []
        if self.rotates_before_reduction:
            ds_internals.run_before_boundary_reduction(engine, self._rotate_gradients_once)
        elif in_boundary_backward:
            self.gradient_hooks = frame.register_gradient_hooks(at_boundary=engine.is_gradient_accumulation_boundary)
        else:
            self.gradient_hooks = frame.register_gradient_hooks()
            accumulation = engine.gradient_accumulation_steps()
            if accumulation > 1:
                warnings.warn(
                    f"OrthoAdam rotates each of the {accumulation} micro-batches' gradients per optimiser step: this "
                    "DeepSpeed config (ZeRO-2, or fp32 gradient accumulation under bf16) takes every micro-batch's "
                    "gradient during its backward. ZeRO-1 rotates once per step (docs/deepspeed.md).", UserWarning, stacklevel=4)
        self._set_master_from_module()
        self._wrap("step", self.step)

    def _wrap(self, name: str, replacement) -> None:
        original = getattr(self.engine, name)
        setattr(self.engine, name, functools.wraps(original)(functools.partial(replacement, original)))

    @torch.no_grad()
    def _set_master_from_module(self) -> None:
        """Master weights := Q theta; the module keeps exactly theta (restored, not rotated back)."""
        if self.master_copy:
            theta = [param.detach().clone() for param in self.frame.params.values()]
            self.frame.rotate_params_()
            ds_internals.copy_module_params_into_master(self.engine)
            for param, real in zip(self.frame.params.values(), theta):
                param.copy_(real)

    def _rotate_gradients_once(self) -> None:
        """Rotate the step's accumulated gradients unless already done (DeepSpeed may reduce twice at a boundary)."""
        if not self._gradients_rotated:
            self.frame.rotate_gradients_()
            self._gradients_rotated = True

    def step(self, original_step, *args, **kwargs):
        if not self.engine.is_gradient_accumulation_boundary():
            return original_step(*args, **kwargs)
        if self.rotates_before_reduction:  # normally done before the reduction; here if DeepSpeed skipped it (no_sync)
            self._rotate_gradients_once()
        if not self.master_copy:  # fp32 at stage 0: AdamW steps the module's parameters themselves
            self.frame.rotate_params_()
        result = original_step(*args, **kwargs)
        self._gradients_rotated = False  # DeepSpeed consumed or (overflow) discarded this step's gradients
        if self.engine.was_step_applied() or not self.master_copy:
            self.frame.unrotate_params_()
        return result

    def save_checkpoint(self, original_save, save_dir, tag=None, client_state=None, **kwargs):
        client_state = {**(client_state or {}), ROTATION_STATE_KEY: asdict(self.frame.spec)}
        return original_save(save_dir, tag=tag, client_state=client_state, **kwargs)

    def _follow_saved_rotations(self, record: dict, load_path: str) -> None:
        """Refuse a checkpoint trained with other rotation settings (its master weights and moments live in another
        frame). One written by an earlier release goes on in its own frame: one from an earlier rotation scheme
        version, or from before ``max_rotated_dim`` existed (it rotated every axis)."""
        saved, current = saved_rotation_spec(record), self.frame.spec
        followed = {"version"} | {name for name in _FIELDS_ADDED_LATER if name not in record}
        if replace(saved, **{name: getattr(current, name) for name in followed}) != current:
            raise RotationMismatchError(
                f"checkpoint {load_path} was trained with OrthoAdam rotations {asdict(saved)} but this engine uses "
                f"{asdict(current)}: set optimizer.params rotation/seed/max_dense_dim/long_axis/max_rotated_dim to "
                "the saved values")
        if saved == current:
            return
        _check_buildable(saved, f"checkpoint {load_path}")
        self.frame.adopt(saved)
        if saved.version != current.version:
            warnings.warn(f"checkpoint {load_path} was written with rotation scheme version {saved.version}: this run "
                          f"goes on with it (new runs use version {rotations.ROTATION_VERSION})", RuntimeWarning,
                          stacklevel=3)
        if saved.max_rotated_dim != current.max_rotated_dim:
            warnings.warn(f"checkpoint {load_path} was written before max_rotated_dim existed, with every axis "
                          f"rotated: this run goes on that way (new runs leave axes over "
                          f"{rotations.DEFAULT_MAX_ROTATED_DIM} unrotated by default)", RuntimeWarning, stacklevel=3)

    def load_checkpoint(self, original_load, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        module_only = load_module_only or not load_optimizer_states
        if module_only and self.partitions_parameters:
            raise RotationMismatchError("load_module_only / load_optimizer_states=False is not supported with OrthoAdam "
                                        "under ZeRO-3: load the full checkpoint, or start the ZeRO-3 run from exported "
                                        "weights (ds_orthoadam.zero_orthoadam.export_fp32_state_dict)")
        load_path, client_state = original_load(
            load_dir, tag=tag, load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
            custom_load_fn=custom_load_fn)
        if load_path is None:
            return load_path, client_state
        saved = (client_state or {}).pop(ROTATION_STATE_KEY, None)
        if module_only:
            # Only the real weights theta are taken, whatever frame (or plain optimiser) wrote them; DeepSpeed has
            # refreshed the master from the module, which is set to this engine's Q theta.
            self._set_master_from_module()
        elif saved is None:
            raise RotationMismatchError(
                f"checkpoint {load_path} was not written by OrthoAdam (no rotation record), so its optimizer state "
                "is in the real frame: load it with load_module_only=True to start OrthoAdam from its weights")
        else:
            # A full load restores the master (phi) and the module (theta) each from its own copy in the checkpoint,
            # so the resumed run is bit-identical, in the frame the checkpoint's moments live in. A universal load
            # (another number of ranks) sets the module from the master instead: theta = Q^T phi, as after a step.
            self._follow_saved_rotations(saved, load_path)
            if ds_internals.load_sets_module_from_master(self.engine):
                self.frame.unrotate_params_()
        return load_path, client_state


def _parameter_ids(model_parameters: list) -> set[int]:
    """ids of the parameters DeepSpeed will step (a list of tensors or of param-group dicts)."""
    ids = set()
    for entry in model_parameters:
        group = entry["params"] if isinstance(entry, dict) else [entry]
        ids.update(id(p) for p in group)
    return ids


def initialize(args=None, model: torch.nn.Module | None = None, optimizer=None, model_parameters=None,
               config: dict | str | None = None, **kwargs):
    """``deepspeed.initialize`` that also understands ``"optimizer": {"type": "OrthoAdam", ...}``.

    Same arguments and return value ``(engine, optimizer, training_dataloader, lr_scheduler)``. Without an OrthoAdam
    section everything is passed to ``deepspeed.initialize`` unchanged. With one, the optimiser is built by DeepSpeed
    (``optimizer`` must be None), rotations are keyed by ``model.named_parameters()`` names so the run equals
    single-process ``ds_orthoadam.OrthoAdam(model.named_parameters(), ...)``; ``engine.orthoadam_frame`` holds them.
    """
    if config is None:
        config = kwargs.pop("config_params", None)  # deepspeed.initialize's older name for config
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None)
    if config is None:
        return deepspeed.initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                    **kwargs)
    ds_config, spec = resolve_config(config)
    if spec is None:
        return deepspeed.initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                    config=ds_config, **kwargs)
    if optimizer is not None:
        raise DeepSpeedConfigError("optimizer: the config selects OrthoAdam, so do not also pass optimizer= "
                                   "to initialize (remove one of the two)")
    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        args = copy.copy(args)
        args.deepspeed_config = None  # deepspeed.initialize refuses a config given twice
    stepped = None
    if model_parameters is not None:  # read twice: by DeepSpeed and for the frame
        model_parameters = [{**entry, "params": list(entry["params"])} if isinstance(entry, dict) else entry
                            for entry in model_parameters]
        # Before initialize: under ZeRO-1/2 DeepSpeed replaces each group's "params" by its flat partition.
        stepped = _parameter_ids(model_parameters)
    engine, ds_optimizer, dataloader, scheduler = deepspeed.initialize(
        args=args, model=model, model_parameters=model_parameters, config=ds_config, **kwargs)
    frame = RotatedFrame(((name, p) for name, p in engine.module.named_parameters()
                          if stepped is None or id(p) in stepped), spec)
    engine.orthoadam_frame = frame
    engine.orthoadam_hooks = OrthoAdamEngineHooks(engine, frame)
    return engine, ds_optimizer, dataloader, scheduler


def export_fp32_state_dict(checkpoint_dir: str, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The real fp32 weights theta of a checkpoint (for OrthoAdam, ``zero_to_fp32`` gives the rotated phi).

    Works on the CPU, without DeepSpeed processes, from the checkpoint files alone: the rotations are regenerated
    from the spec recorded in the checkpoint and the parameter names. At ZeRO stage 0 (fp32, fp16 or bf16) there is no
    optimizer partition file for ``zero_to_fp32`` to read: the checkpoint's module weights, like
    ``engine.module.state_dict()``, are already theta and are returned as fp32 (under fp16 or bf16 they carry that
    rounding).
    """
    saved = ds_internals.checkpoint_client_state(checkpoint_dir, tag)
    if ds_internals.weights_only_in_model_states(checkpoint_dir, tag, saved):
        return {name: tensor.float() for name, tensor in saved["module"].items()}
    phi = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    if ROTATION_STATE_KEY not in saved:
        return phi  # not an OrthoAdam checkpoint: DeepSpeed's weights are already real
    optimized = {name for group in saved["param_shapes"] for name in group}
    trainable = [(name, torch.nn.Parameter(tensor)) for name, tensor in phi.items() if name in optimized]
    spec = saved_rotation_spec(saved[ROTATION_STATE_KEY])
    _check_buildable(spec, checkpoint_dir)
    return RotatedFrame(trainable, spec).unrotate_state_dict(phi)
