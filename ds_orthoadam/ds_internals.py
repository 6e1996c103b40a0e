"""Everything ds_orthoadam relies on that DeepSpeed does not document as public API (checked against 0.19.8).

The OrthoAdam integration (:mod:`ds_orthoadam.zero_orthoadam`) keeps DeepSpeed's fp32 master weights and Adam
moments in the rotated frame phi = Q theta and the module's own parameters in the real frame theta. That needs five
facts about DeepSpeed's internals; each is one function here, and ``tests/test_zero_orthoadam.py`` checks every one
against the installed DeepSpeed, so an upgrade that breaks one fails loudly there instead of silently training in
the wrong frame:

1. which configurations keep a separate fp32 master copy that DeepSpeed writes back into the module's parameters
   (and all-gathers) at the end of every applied step (ZeRO 1/2, and the bf16/fp16 wrappers at stage 0);
2. how to push the module's parameters into that master copy (``refresh_fp32_params``, used by DeepSpeed itself
   for ``load_module_only``); a full ``load_checkpoint`` restores the master from the checkpoint's fp32 weights
   and the module from the checkpoint's module weights, without copying one into the other;
3. that the inner optimiser of a ZeRO/bf16 wrapper is ``engine.optimizer.optimizer`` (for the memory report);
4. the names DeepSpeed resolves for ``"optimizer": {"type": ...}`` (``DEEPSPEED_OPTIMIZERS`` or ``torch.optim``);
5. the checkpoint layout read by the weight export: ``client_state`` is merged into ``mp_rank_00_model_states.pt``.

Public APIs used elsewhere (``engine.was_step_applied``, ``engine.is_gradient_accumulation_boundary``,
``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``, tensor hooks) are not wrapped here.
"""
from __future__ import annotations

import os

import deepspeed
import torch
from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
from deepspeed.utils.zero_to_fp32 import get_model_state_file

TESTED_DEEPSPEED_VERSION = "0.19.8"


def optimizer_keeps_master_copy(engine: "deepspeed.DeepSpeedEngine") -> bool:
    """True when DeepSpeed steps a separate fp32 copy and copies it back into ``engine.module`` after each step.

    That is ZeRO stage 1/2 (any precision) and, at stage 0, the bf16 (``BF16_Optimizer``) and fp16
    (``FP16_Optimizer``) wrappers. Only plain fp32 at stage 0 steps the module's parameters in place.
    """
    return engine.zero_optimization_stage() >= 1 or engine.bfloat16_enabled() or engine.fp16_enabled()


def copy_module_params_into_master(engine: "deepspeed.DeepSpeedEngine") -> None:
    """Overwrite DeepSpeed's fp32 master weights with the module's current parameters (on every rank)."""
    engine.optimizer.refresh_fp32_params()


def inner_optimizer(engine: "deepspeed.DeepSpeedEngine") -> torch.optim.Optimizer:
    """The torch optimiser DeepSpeed steps (on this rank's flat fp32 partition when ZeRO/bf16 wrap it)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def optimizer_name_resolvable(name: str) -> bool:
    """Whether ``"optimizer": {"type": name}`` names an optimiser DeepSpeed can build itself."""
    return name.lower() in DEEPSPEED_OPTIMIZERS or hasattr(torch.optim, name)


def checkpoint_client_state(checkpoint_dir: str, tag: str | None) -> dict:
    """The dict saved in a DeepSpeed checkpoint's model-states file (``client_state`` keys live at its top level)."""
    if tag is None:
        with open(os.path.join(checkpoint_dir, "latest"), encoding="utf-8") as latest:
            tag = latest.read().strip()
    return torch.load(get_model_state_file(os.path.join(checkpoint_dir, tag), zero_stage=2),
                      map_location="cpu", weights_only=False)


def skip_shm_comm_build() -> None:
    """Skip the 40 s JIT build of the ``deepspeed_shm_comm`` op on CPU (only inference all-reduce uses it)."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
