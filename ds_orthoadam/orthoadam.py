"""OrthoAdam (Kaul et al., ICLR 2025, Algorithm 1): Adam whose moments live in a fixed random orthogonal basis.

Per parameter theta with gradient g and fixed rotation Q (see :mod:`ds_orthoadam.rotations`)::

    g~ = Q g;   m = b1 m + (1-b1) g~;   v = b2 v + (1-b2) g~^2            (moments in the rotated frame)
    theta <- theta (1 - lr wd) - lr Q^T( m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) )

which is exactly ``torch.optim.AdamW`` run on phi = Q theta (decoupled weight decay commutes with Q). Because Adam
is only equivariant to signed permutations, a rotation that mixes coordinates changes the trajectory and removes the
privileged basis that lets outlier features form.

State (``exp_avg``, ``exp_avg_sq`` in the rotated frame, ``step``) round-trips through ``state_dict``; rotations
are never stored: they are regenerated from the group's ``(seed, rotation, max_dense_dim, long_axis,
max_rotated_dim)`` and the parameter's key, which is its name when the optimiser is given
``model.named_parameters()`` and ``f"param{i}"`` otherwise (i = the parameter's position across all param groups,
its id in ``state_dict()``). The DeepSpeed
integration therefore gets the same Q from ``make_rotation(p.shape, kind, seed, name, max_dense_dim,
long_axis=long_axis, max_rotated_dim=max_rotated_dim)``.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.adamw import adamw

from ds_orthoadam.errors import UserError
from ds_orthoadam.rotations import (
    DEFAULT_LONG_AXIS,
    DEFAULT_MAX_DENSE_DIM,
    DEFAULT_MAX_ROTATED_DIM,
    ROTATION_VERSION,
    LongAxisError,
    MaxRotatedDimError,
    Rotation,
    RotationKindError,
    RotationVersionError,
    ScratchBuffers,
    check_kind,
    check_long_axis,
    check_max_rotated_dim,
    check_version,
    make_rotation,
)

try:  # torch's own (private) list of devices with a fused AdamW kernel; without it the unfused path is used
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    _FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())
except ImportError:
    _FUSED_DEVICES = frozenset()


class OrthoAdamConfigError(UserError, ValueError):
    """A hyper-parameter of OrthoAdam is invalid."""


class OrthoAdamStateError(UserError, ValueError):
    """A state dict does not fit the parameters it is loaded onto."""


def _validate_group(group: dict[str, Any]) -> None:
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if isinstance(lr, torch.Tensor) or not lr >= 0.0:
        raise OrthoAdamConfigError(f"invalid learning rate lr={lr!r}: use a float >= 0")
    for name, beta in (("betas[0]", beta1), ("betas[1]", beta2)):
        if not 0.0 <= beta < 1.0:
            raise OrthoAdamConfigError(f"invalid {name}={beta!r}: betas must lie in [0, 1), e.g. (0.9, 0.999)")
    if not eps >= 0.0:
        raise OrthoAdamConfigError(f"invalid eps={eps!r}: use a float >= 0, e.g. 1e-8")
    if not weight_decay >= 0.0:
        raise OrthoAdamConfigError(f"invalid weight_decay={weight_decay!r}: use a float >= 0")
    try:
        check_kind(group["rotation"])
        check_long_axis(group["long_axis"])
        check_max_rotated_dim(group["max_rotated_dim"])
        check_version(group["rotation_version"])
    except (RotationKindError, LongAxisError, MaxRotatedDimError, RotationVersionError) as error:
        raise OrthoAdamConfigError(str(error)) from error
    if not isinstance(group["seed"], int):
        raise OrthoAdamConfigError(f"invalid seed={group['seed']!r}: use an int")
    if not isinstance(group["max_dense_dim"], int) or group["max_dense_dim"] < 1:
        raise OrthoAdamConfigError(f"invalid max_dense_dim={group['max_dense_dim']!r}: use an int >= 1")


def _state_dtype(parameter: torch.Tensor) -> torch.dtype:
    """Moments and rotations of half-precision parameters are kept in float32 (rotations amplify rounding)."""
    return torch.promote_types(parameter.dtype, torch.float32)


class OrthoAdam(Optimizer):
    """AdamW in a fixed random orthogonal frame per parameter (see the module docstring).

    Args:
        params: parameters, ``model.named_parameters()`` (names become rotation keys) or param-group dicts.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW`` (decoupled weight decay).
        rotation: ``"dense"`` (Haar-random matrix per axis) or ``"hadamard"`` (randomised Walsh-Hadamard per axis,
            O(n log n)).
        seed: seeds all rotations (together with each parameter's key).
        max_dense_dim: longest axis that gets the ``rotation`` kind's transform; longer ones get ``long_axis``.
        long_axis: ``"hadamard"`` (default) or ``"identity"`` (axes over ``max_dense_dim`` stay unrotated).
        max_rotated_dim: axes longer than this (default 16384: the vocabulary) stay unrotated, which keeps Adam's
            per-token normalisation; None rotates every axis. See :mod:`ds_orthoadam.rotations` for why.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rotation: str = "dense",
        seed: int = 0,
        max_dense_dim: int = DEFAULT_MAX_DENSE_DIM,
        long_axis: str = DEFAULT_LONG_AXIS,
        max_rotated_dim: int | None = DEFAULT_MAX_ROTATED_DIM,
    ):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rotation=rotation, seed=seed,
                        max_dense_dim=max_dense_dim, long_axis=long_axis, max_rotated_dim=max_rotated_dim,
                        rotation_version=ROTATION_VERSION)
        self._rotations: dict[torch.Tensor, tuple[tuple, Rotation]] = {}
        self._scratch = ScratchBuffers()
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _validate_group(self.param_groups[-1])

    def parameter_keys(self) -> list[tuple[dict[str, Any], torch.Tensor, str]]:
        """(group, parameter, rotation key) for every parameter, in state-dict order."""
        entries, index = [], 0
        for group in self.param_groups:
            names = group.get("param_names")
            for position, parameter in enumerate(group["params"]):
                entries.append((group, parameter, names[position] if names else f"param{index}"))
                index += 1
        return entries

    def rotation_for(self, group: dict[str, Any], parameter: torch.Tensor, key: str) -> Rotation:
        """The (cached) rotation of ``parameter``; rebuilt if its group's rotation settings changed."""
        spec = (key, group["rotation"], group["seed"], group["max_dense_dim"], group["long_axis"],
                group["max_rotated_dim"], group["rotation_version"], parameter.shape, parameter.device,
                _state_dtype(parameter))
        cached = self._rotations.get(parameter)
        if cached is None or cached[0] != spec:
            rotation = make_rotation(parameter.shape, group["rotation"], group["seed"], key, group["max_dense_dim"],
                                     device=parameter.device, dtype=_state_dtype(parameter),
                                     long_axis=group["long_axis"], version=group["rotation_version"],
                                     max_rotated_dim=group["max_rotated_dim"])
            cached = self._rotations[parameter] = (spec, rotation)
        return cached[1]

    def rotation_nbytes(self) -> int:
        """Bytes taken by the rotations of all parameters (builds them if needed)."""
        return sum(self.rotation_for(group, p, key).nbytes for group, p, key in self.parameter_keys())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load after checking the rotation scheme version and that every saved moment has its parameter's shape.

        The saved groups' ``rotation``, ``seed``, ``max_dense_dim``, ``long_axis``, ``max_rotated_dim`` and
        ``rotation_version`` replace the current ones (as for any torch hyper-parameter), so the moments are used in
        the frame they were accumulated in: a run started with an earlier rotation scheme goes on with it, and one
        from before ``max_rotated_dim`` existed goes on rotating every axis (a warning says so for either). The
        rotation keys are the saved run's too: names if it had them, else ``param{i}``. Moments keep their saved
        float32 (torch would cast them to a half-precision parameter's dtype).
        """
        for group in state_dict["param_groups"]:
            try:
                check_version(group.get("rotation_version"))
            except RotationVersionError as error:
                raise OrthoAdamStateError(f"state dict: {error} (its moments live in that scheme's frame)") from error
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        current = self.parameter_keys()
        if len(saved_ids) != len(current):
            raise OrthoAdamStateError(
                f"state dict holds {len(saved_ids)} parameters but this optimiser has {len(current)}: "
                "load it into an optimiser built over the same model and param groups"
            )
        moments: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for saved_id, (_, parameter, key) in zip(saved_ids, current):
            saved = state_dict["state"].get(saved_id, {})
            for name in ("exp_avg", "exp_avg_sq"):
                if name in saved and saved[name].shape != parameter.shape:
                    raise OrthoAdamStateError(
                        f"state dict entry {saved_id} ({key}) has {name} of shape {tuple(saved[name].shape)} but "
                        f"the parameter has shape {tuple(parameter.shape)}: the checkpoint belongs to a different "
                        "model configuration"
                    )
                if name in saved:
                    moments.setdefault(parameter, {})[name] = saved[name]
        super().load_state_dict(state_dict)
        for parameter, saved in moments.items():
            for name, tensor in saved.items():
                self.state[parameter][name] = tensor.to(parameter.device, _state_dtype(parameter), copy=True)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            if "param_names" not in saved_group:  # torch fills in the current names: the saved keys were param{i}
                group.pop("param_names", None)
            group.setdefault("long_axis", DEFAULT_LONG_AXIS)  # version-1 state dicts from before long_axis existed
            group.setdefault("max_rotated_dim", None)  # state dicts from before it existed rotated every axis
            _validate_group(group)
        self._warn_about_earlier_frames(state_dict["param_groups"])
        self._rotations.clear()

    @staticmethod
    def _warn_about_earlier_frames(saved_groups: list[dict[str, Any]]) -> None:
        versions = {group["rotation_version"] for group in saved_groups} - {ROTATION_VERSION}
        if versions:
            warnings.warn(f"state dict written with rotation scheme version {min(versions)}: this run goes on with it "
                          f"(new runs use version {ROTATION_VERSION})", RuntimeWarning, stacklevel=3)
        if any("max_rotated_dim" not in group for group in saved_groups):
            warnings.warn("state dict written before max_rotated_dim existed, with every axis rotated: this run goes "
                          f"on that way (new runs leave axes over {DEFAULT_MAX_ROTATED_DIM} unrotated by default)",
                          RuntimeWarning, stacklevel=3)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        by_group: dict[int, list[tuple[torch.Tensor, str]]] = {}
        for group, parameter, key in self.parameter_keys():
            if parameter.grad is not None:
                by_group.setdefault(id(group), []).append((parameter, key))
        for group in self.param_groups:
            if id(group) in by_group:
                self._step_group(group, by_group[id(group)])
        return loss

    def workspace_nbytes(self) -> int:
        """Bytes held by the scratch buffers (CPU: two times the largest parameter once a step has run; else 0)."""
        return self._scratch.nbytes

    def _step_group(self, group: dict[str, Any], entries: list[tuple[torch.Tensor, str]]) -> None:
        """Adam's moment and direction math is torch's own AdamW (its fused kernel where the device has one),
        applied in the rotated frame to a zeroed scratch "parameter": it comes back as minus the bias-corrected
        direction m^ / (sqrt(v^) + eps), which is rotated back and applied with decoupled weight decay."""
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        for parameter, key in entries:
            if parameter.grad.is_sparse:
                raise OrthoAdamConfigError(f"OrthoAdam does not support sparse gradients ({key})")
            rotation = self.rotation_for(group, parameter, key)
            dtype = _state_dtype(parameter)
            state = self.state[parameter]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(parameter, dtype=dtype)
                state["exp_avg_sq"] = torch.zeros_like(parameter, dtype=dtype)
            workspace = self._scratch.get(parameter.numel(), parameter.device, dtype)

            rotated = rotation.rotate(parameter.grad.to(dtype), workspace)
            free = Rotation.free_buffer(rotated, workspace)
            direction = torch.zeros_like(rotated) if free is None else free.view_as(parameter).zero_()
            step = torch.tensor(float(state["step"]), device=parameter.device)  # torch's AdamW increments it
            adamw([direction], [rotated], [state["exp_avg"]], [state["exp_avg_sq"]], [], [step],
                  fused=parameter.device.type in _FUSED_DEVICES, amsgrad=False, beta1=beta1, beta2=beta2, lr=1.0,
                  weight_decay=0.0, eps=eps, maximize=False)
            state["step"] += 1
            if weight_decay != 0.0:
                parameter.mul_(1 - lr * weight_decay)
            parameter.add_(rotation.unrotate(direction, workspace).to(parameter.dtype), alpha=lr)
