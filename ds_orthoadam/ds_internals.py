"""Everything ds_orthoadam relies on that DeepSpeed does not document as public API (checked against 0.19.8).

The OrthoAdam integration (:mod:`ds_orthoadam.zero_orthoadam`) keeps DeepSpeed's fp32 master weights and Adam
moments in the rotated frame phi = Q theta and the module's own parameters in the real frame theta. That needs the
first eight facts about DeepSpeed's internals below, the trainer the others; each is one function or constant here
(17 is a guarantee the trainer relies on by not acting), and ``tests/test_ds_internals.py`` checks every one against
the installed DeepSpeed, so an upgrade that breaks one fails loudly there instead of silently training in the wrong
frame (or logging a resumed run twice):

1. which configurations keep a separate fp32 master copy that DeepSpeed writes back into the module's parameters
   (and all-gathers) at the end of every applied step (ZeRO 1/2, and the fp16/bf16 wrappers at stage 0);
2. how to push the module's parameters into that master copy (``refresh_fp32_params``, used by DeepSpeed itself
   for ``load_module_only``); a full ``load_checkpoint`` restores the master from the checkpoint's fp32 weights
   and the module from the checkpoint's module weights, without copying one into the other;
3. that the inner optimiser of a ZeRO/bf16 wrapper is ``engine.optimizer.optimizer`` (for the memory report);
4. the names DeepSpeed resolves for ``"optimizer": {"type": ...}`` (``DEEPSPEED_OPTIMIZERS`` or ``torch.optim``);
5. the checkpoint layout read by the weight export: ``client_state`` and the module weights are in
   ``mp_rank_00_model_states.pt``, where stage 0 also keeps the optimizer state (fp32, fp16 or bf16; ZeRO 1/2
   write ``*_optim_states.pt`` files instead);
6. in which configurations DeepSpeed leaves every ``p.grad`` to accumulate over the micro-batches of a step and
   reduces it only on the boundary micro-batch (ZeRO stage 0, and stage 1 without ``overlap_comm`` when gradients
   accumulate in the parameter dtype): there no DeepSpeed gradient hook consumes ``p.grad`` early;
7. that, in those configurations, the reduction is ``engine.allreduce_gradients()`` looked up on the engine
   instance (from the backward epilogue, or from ``step()`` without managed accumulation), so a wrapper installed
   on the instance runs right before DeepSpeed reads the accumulated ``p.grad``;
8. that at ZeRO-1 with ``overlap_comm`` DeepSpeed leaves ``p.grad`` to accumulate over the non-boundary
   micro-batches and reduces it from a post-accumulation hook in the boundary micro-batch's backward, after the
   parameter's own tensor hooks have run (:func:`reduces_accumulated_grads_in_boundary_backward`);
9. that DeepSpeed's TensorBoard monitor keeps its ``torch.utils.tensorboard.SummaryWriter`` (rank 0) at
   ``engine.monitor.tb_monitor.summary_writer``, the writer that ``engine.monitor.write_events`` and DeepSpeed's own
   ``Train/Samples/*`` events go through (for the resume purge);
10. the csv monitor's file layout and its per-process record of headers written (:func:`csv_monitor_files`, for the
    same purge);
11. ZeRO-3 (``deepspeed/runtime/zero/partition_parameters.py``): a partitioned parameter carries ``ds_id`` and its
    whole shape ``ds_shape``; every gather, whichever path runs it (the prefetch coordinator's
    ``all_gather_coalesced`` handles, ``GatheredParameters``' and the persistent parameters' ``all_gather``), ends
    by setting ``param.ds_status`` to ``AVAILABLE`` (from ``INFLIGHT`` or ``NOT_AVAILABLE``) once ``param.data``
    holds the whole gathered tensor, and nothing else sets it to ``AVAILABLE`` after the initial conversion
    (:func:`on_zero3_gather`);
12. ZeRO-3 copies a parameter's whole data into its partition only in ``param.partition(param_list,
    has_been_updated=True)`` (``GatheredParameters`` with a modifier rank, ``zero.Init``), called on any one
    parameter for the whole list (:func:`before_zero3_write_back`); its fp32 master is refreshed from those
    partitions by ``refresh_fp32_params`` (:func:`rewrite_zero3_partitions`);
13. ZeRO-3 registers its gradient reduction as a post-accumulate-grad hook (``register_grad_hook``), so a tensor hook
    on the parameter hands it the gradient it reduce-scatters (:func:`zero3_reduces_after_tensor_hooks`);
14. ZeRO-3 writes its model states as ``zero_pp_rank_0_mp_rank_00_model_states.pt`` (:func:`checkpoint_client_state`);
15. resuming on another number of ranks (:func:`checkpoint_partition_count`, :func:`convert_to_universal`,
    :func:`load_universal`): ZeRO 1/2 write one ``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per data-parallel
    rank (stage 0 in fp32 none). DeepSpeed's universal-checkpoint converter (``deepspeed.checkpoint.ds_to_universal``,
    its ``main`` takes its command line's namespace) refuses a checkpoint whose model states lack a top-level
    ``universal_checkpoint_info`` (Megatron-DeepSpeed records it; DeepSpeed's engine does not): the trainer records
    it (:func:`universal_checkpoint_info`, the version entry alone for a model without tensor/pipeline parallelism,
    what ``--inject_missing_state`` adds). An engine built with ``"checkpoint": {"load_universal": true}`` loads the
    per-parameter files from ``<load_dir>/<tag>/zero`` and then, below ZeRO-3, sets the module's parameters from the
    fp32 master (``update_lp_params``), not from the checkpoint's module weights, so under OrthoAdam the module holds
    phi after such a load (:func:`load_sets_module_from_master`);
16. DeepSpeed's documented memory estimators for hypothetical models
    (``estimate_zero2_model_states_mem_needs_all_cold``, ``estimate_zero3_model_states_mem_needs_all_cold``) only
    print; the numbers they print come from ``estimate_zero2_model_states_mem_needs`` /
    ``estimate_zero3_model_states_mem_needs``, which return them in bytes (:func:`zero2_estimate`,
    :func:`zero3_estimate`, for ``ds_orthoadam.memory_plan``);
17. ZeRO-3's ``engine.save_checkpoint`` writes each rank's partitions as they are: it gathers no parameter and writes
    nothing back into a partition (only ``save_16bit_model`` consolidates whole weights, through a write-back that
    OrthoAdam's frame rounds until the next step), so the trainer's checkpoints leave the weights it trains on
    bit for bit unchanged (nothing to call: the trainer relies on it by saving with ``save_checkpoint`` only);
18. ZeRO-3 cannot run under torch's non-reentrant activation checkpointing (transformers' default): the recomputation
    inside the backward saves a different number of tensors than the forward did (DeepSpeed's gather/release hooks
    around each submodule) and torch raises ``CheckpointError``; the reentrant implementation works at every stage
    (:data:`ACTIVATION_CHECKPOINTING_KWARGS`);
19. ZeRO-3's universal load (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) sets the hyperparameters of
    *every* param group to the saved first group's (the norm gains exempt from weight decay would be decayed), and
    gives every group's optimizer state the *same* ``step`` tensor, which torch's Adam then increments in place once
    per group and step (wrong bias correction from the first step on):
    :func:`zero3_universal_load_repaired` (checked by ``tests/test_train_e2e.py::test_resume_on_another_number_of_ranks``).

Public APIs used elsewhere (``engine.was_step_applied``, ``engine.is_gradient_accumulation_boundary``,
``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``, tensor hooks) are not wrapped here.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
from pathlib import Path
from typing import Callable, Iterable

import deepspeed
import torch
from deepspeed.checkpoint.constants import (OPTIMIZER_STATE_DICT, UNIVERSAL_CHECKPOINT_INFO,
                                           UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE,
                                           ZERO_STAGE)
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.utils.zero_to_fp32 import get_model_state_file


def optimizer_keeps_master_copy(engine: "deepspeed.DeepSpeedEngine") -> bool:
    """True when DeepSpeed steps a separate fp32 copy and copies it back into ``engine.module`` after each step.

    That is ZeRO stage 1/2 (any precision; ``BF16_Optimizer`` for bf16 with fp32 gradient accumulation) and, at stage
    0, the ``FP16_Optimizer``/``FP16_UnfusedOptimizer`` wrappers DeepSpeed uses for fp16 and bf16. Only plain fp32 at
    stage 0 steps the module's parameters in place.
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


def reduces_accumulated_grads_at_boundary(engine: "deepspeed.DeepSpeedEngine") -> bool:
    """True when ``p.grad`` accumulates untouched over a step's micro-batches and is reduced once, at the boundary.

    ZeRO-1 (``DeepSpeedZeroOptimizer`` without gradient partitioning) creates gradient hooks only to partition or
    overlap the reduction (``overlap_comm``: the boundary micro-batch is reduced during its backward) or to move
    each micro-batch's gradient into a separate accumulation buffer (``grad_accum_dtype`` other than the parameter
    dtype); with none of these its hooks leave ``p.grad`` alone and ``reduce_gradients`` reads it in
    ``allreduce_gradients``. Stage 0 (plain, ``FP16_Optimizer``/``FP16_UnfusedOptimizer`` for fp16 and bf16)
    has no gradient hooks. ``BF16_Optimizer`` accumulates into fp32 buffers after every micro-batch.
    Anything else (stage 2, pipelines, DeepCompile, no backward all-reduce) answers False: the caller then rotates
    every micro-batch's gradient in a tensor hook, which is exact wherever DeepSpeed reduces.
    """
    if not _plain_data_parallel(engine):
        return False
    optimizer = engine.optimizer
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        return not (optimizer.overlap_comm or _takes_every_micro_batch(optimizer))
    return engine.zero_optimization_stage() == 0


def reduces_accumulated_grads_in_boundary_backward(engine: "deepspeed.DeepSpeedEngine") -> bool:
    """True when ``p.grad`` accumulates untouched over the non-boundary micro-batches and DeepSpeed reduces (and
    removes) it from its post-accumulation hook during the boundary micro-batch's backward.

    That is ZeRO-1 with ``overlap_comm``: without gradient partitioning, ``reduce_ready_partitions_and_remove_grads``
    acts only when ``is_gradient_accumulation_boundary()``. A tensor hook on the parameter runs before autograd
    accumulates into ``p.grad``, so on the boundary micro-batch it can fold the accumulated ``p.grad`` into the
    incoming gradient, clear ``p.grad`` and return what DeepSpeed is to reduce.
    """
    optimizer = engine.optimizer
    return (_plain_data_parallel(engine) and isinstance(optimizer, DeepSpeedZeroOptimizer)
            and optimizer.overlap_comm and not _takes_every_micro_batch(optimizer))


def _plain_data_parallel(engine: "deepspeed.DeepSpeedEngine") -> bool:
    """No pipeline, DeepCompile or BF16_Optimizer, and the backward all-reduce enabled: the cases analysed here."""
    return not (engine.pipeline_parallelism or engine.is_deepcompile_enabled() or not engine.enable_backward_allreduce
                or isinstance(engine.optimizer, BF16_Optimizer))


def _takes_every_micro_batch(optimizer: DeepSpeedZeroOptimizer) -> bool:
    """ZeRO-2 partitions, a separate accumulation dtype copies, offload and ZenFlow move every micro-batch's
    gradient out of ``p.grad`` during its backward."""
    return bool(optimizer.partition_gradients or optimizer.use_grad_accum_attribute or optimizer.cpu_offload
                or optimizer.zenflow)


def run_before_boundary_reduction(engine: "deepspeed.DeepSpeedEngine", callback: Callable[[], None]) -> None:
    """Run ``callback()`` on the boundary micro-batch right before DeepSpeed reduces the accumulated ``p.grad``.

    Only meaningful where :func:`reduces_accumulated_grads_at_boundary` holds. Installed on the engine instance,
    so DeepSpeed's own calls (backward epilogue, ``step()``) and a user's explicit ``engine.allreduce_gradients()``
    all pass through it; whatever ``callback`` leaves in ``p.grad`` is what DeepSpeed reduces, clips and steps.
    """
    original = engine.allreduce_gradients

    @functools.wraps(original)
    def allreduce_gradients(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            callback()
        return original(*args, **kwargs)

    engine.allreduce_gradients = allreduce_gradients


ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # rank 0's; ZeRO 0-2 write mp_rank_00_model_states.pt


def is_zero3_param(param: torch.Tensor) -> bool:
    """Whether ``param`` has been converted by ZeRO-3 (``zero.Init`` or ``deepspeed.initialize`` at stage 3)."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    """The whole shape of a parameter: ``ds_shape`` under ZeRO-3 (``param.shape`` is then that of the local
    placeholder, ``[0]`` while partitioned), else ``param.shape``."""
    return param.ds_shape if is_zero3_param(param) else param.shape


_STATUS_KEY = "_ds_orthoadam_ds_status"
_GATHER_CALLBACK_KEY = "_ds_orthoadam_after_gather"
_OBSERVED_CLASSES: dict[type, type] = {}


def _status(param: torch.Tensor) -> ZeroParamStatus:
    return param.__dict__[_STATUS_KEY]


def _set_status(param: torch.Tensor, status: ZeroParamStatus) -> None:
    previous = param.__dict__.get(_STATUS_KEY)
    param.__dict__[_STATUS_KEY] = status
    if status is ZeroParamStatus.AVAILABLE and previous in (ZeroParamStatus.INFLIGHT, ZeroParamStatus.NOT_AVAILABLE):
        param.__dict__[_GATHER_CALLBACK_KEY](param)


def _observed_class(cls: type) -> type:
    """``cls`` with ``ds_status`` made a property whose setter reports completed gathers (one subclass per class)."""
    if cls not in _OBSERVED_CLASSES:
        _OBSERVED_CLASSES[cls] = type(f"GatherObserved{cls.__name__}", (cls,),
                                      {"ds_status": property(_status, _set_status), "__module__": __name__})
    return _OBSERVED_CLASSES[cls]


def on_zero3_gather(params: Iterable[torch.nn.Parameter], after: Callable[[torch.nn.Parameter], None]) -> None:
    """Run ``after(param)`` each time ZeRO-3 has gathered ``param``'s whole data, before anything reads it.

    Every gather path ends by setting ``param.ds_status = AVAILABLE`` (from ``INFLIGHT`` or ``NOT_AVAILABLE``) once
    ``param.data`` is whole: the coordinator's forward/backward fetches and prefetches, ``GatheredParameters``, the
    persistent parameters' re-gather after each step and after a checkpoint load. Each parameter's class is swapped
    for a subclass (of its own class: ``isinstance`` and autograd are unchanged) in which ``ds_status`` is a property
    whose setter calls ``after`` on that transition. ``after`` may change ``param.data`` in place.
    """
    for param in params:
        param.__dict__[_GATHER_CALLBACK_KEY] = after
        if _STATUS_KEY not in param.__dict__:  # not observed yet
            status = param.__dict__.pop("ds_status")
            param.__class__ = _observed_class(type(param))
            param.__dict__[_STATUS_KEY] = status


def before_zero3_write_back(params: Iterable[torch.nn.Parameter], before: Callable[[torch.nn.Parameter], None]) -> None:
    """Run ``before(p)`` right before ZeRO-3 copies the whole data of a gathered ``p`` into its partition.

    That copy happens only in ``partition(param_list, has_been_updated=True)``, which DeepSpeed calls on one
    parameter (e.g. the first of a ``GatheredParameters`` list) for a whole list: it is wrapped on every parameter
    given here (pass all of the module's), and ``before`` is called for each gathered parameter of the list.
    """
    for param in params:
        original = param.partition

        def partition(param_list=None, hierarchy=0, has_been_updated=False, free_data=True, _param=param,
                      _original=original):
            if has_been_updated:
                for item in (param_list if param_list is not None else [_param]):
                    if item.ds_status is ZeroParamStatus.AVAILABLE:
                        before(item)
            return _original(param_list=param_list, hierarchy=hierarchy, has_been_updated=has_been_updated,
                             free_data=free_data)

        param.partition = partition


def rewrite_zero3_partitions(engine: "deepspeed.DeepSpeedEngine",
                             params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Gather each parameter (one at a time: a collective, every rank must call this) and write its whole data back
    into its partition, then refresh DeepSpeed's fp32 master partitions from those bit16/fp32 partitions.

    With :func:`before_zero3_write_back` installed, the partitions (and the master) receive what that callback makes
    of the gathered data. A parameter that was gathered before (ZeRO-3 keeps small "persistent" ones whole) is
    partitioned afterwards: they are returned, for the caller to gather again (:func:`gather_zero3_params`) once it
    has installed what a gather must run.
    """
    were_gathered = []
    for param in params:
        if param.ds_status is ZeroParamStatus.AVAILABLE:
            were_gathered.append(param)
        param.all_gather()
        param.partition(has_been_updated=True)
    engine.optimizer.refresh_fp32_params()
    return were_gathered


def gather_zero3_params(params: list[torch.nn.Parameter]) -> None:
    """Gather ``params`` (a collective: every rank passes the same list) and leave them gathered."""
    if params:
        params[0].all_gather(param_list=params)


def zero3_reduces_after_tensor_hooks(engine: "deepspeed.DeepSpeedEngine") -> bool:
    """Whether the engine is ZeRO-3 and reduces each parameter's gradient from a post-accumulate-grad hook, i.e.
    after the parameter's tensor hooks have run, from ``p.grad`` of the whole (gathered) parameter."""
    return engine.zero_optimization_stage() == 3 and not engine.is_deepcompile_enabled()


def _tag_or_latest(checkpoint_dir: str, tag: str | None) -> str:
    if tag is not None:
        return tag
    with open(os.path.join(checkpoint_dir, "latest"), encoding="utf-8") as latest:
        return latest.read().strip()


def checkpoint_client_state(checkpoint_dir: str, tag: str | None) -> dict:
    """The dict saved in a DeepSpeed checkpoint's model-states file (``client_state`` keys live at its top level;
    the module's weights under ``"module"``)."""
    directory = os.path.join(checkpoint_dir, _tag_or_latest(checkpoint_dir, tag))
    stage = 3 if os.path.exists(os.path.join(directory, ZERO3_MODEL_STATES)) else 2
    return torch.load(get_model_state_file(directory, zero_stage=stage), map_location="cpu", weights_only=False)


def weights_only_in_model_states(checkpoint_dir: str, tag: str | None, saved: dict) -> bool:
    """Whether ``zero_to_fp32`` cannot read a checkpoint's fp32 weights, so that only the module weights in its
    model-states file (``saved``) are left: ZeRO stage 0, whose optimizer state is in the model-states file
    (``saved["optimizer"]``, None under ZeRO 1/2), without ``*_optim_states.pt`` files (fp32, fp16 and bf16 alike);
    or DeepSpeed's ``BF16_Optimizer`` (bf16 with fp32 gradient accumulation), whose partition files (named
    ``bf16_zero_pp_rank_*`` like a bf16 ZeRO-1 optimizer's) record no ZeRO stage, which ``zero_to_fp32`` requires
    ("is not a zero checkpoint" in 0.19.8). A ZeRO 1/2 checkpoint that lost its partition files is neither."""
    partitions = sorted(Path(checkpoint_dir, _tag_or_latest(checkpoint_dir, tag)).glob("*_optim_states.pt"))
    if partitions:
        # Memory-mapped: only the record's structure is read here, not the partition's tensors (zero_to_fp32 or the
        # module-weights export reads what it needs afterwards).
        state = torch.load(partitions[0], map_location="cpu", weights_only=False, mmap=True)
        return ZERO_STAGE not in state.get(OPTIMIZER_STATE_DICT, {})
    return saved.get("optimizer") is not None


def universal_checkpoint_info() -> dict:
    """``client_state`` entry that makes a checkpoint convertible by ``ds_to_universal`` (to resume it on another
    data-parallel size with ``"checkpoint": {"load_universal": true}``): DeepSpeed saves ``client_state`` keys at
    the top level of the model-states file, where the converter looks for it. No tensor/pipeline parallelism here,
    so the version entry is all it holds (the converter's own ``--inject_missing_state`` adds the same)."""
    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def checkpoint_partition_count(tag_dir: str | os.PathLike) -> int:
    """Data-parallel ranks whose ZeRO optimizer partitions a checkpoint holds (one file each); 0 where the optimizer
    state is not partitioned (stage 0 in fp32: it is in the model-states file, whole)."""
    return len(list(Path(tag_dir).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def convert_to_universal(tag_dir: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """DeepSpeed's universal checkpoint of ``tag_dir`` (ZeRO 1/2) in ``output_dir``: every parameter's fp32 weights,
    moments and step whole, under ``output_dir/zero/<name>/``, plus the model-states file (client state)."""
    from deepspeed.checkpoint import ds_to_universal  # a command-line module: imported only when converting

    options = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(output_dir), num_extract_workers=1,
                                 num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
        ds_to_universal.main(options)


def load_universal(config: dict) -> dict:
    """``config`` for an engine that loads universal checkpoints (:func:`convert_to_universal`); after such a load the
    module's parameters are set from the fp32 master."""
    checkpoint = {**config.get("checkpoint", {}), "load_universal": True}
    return {**config, "checkpoint": checkpoint}


@contextlib.contextmanager
def zero3_universal_load_repaired(engine: "deepspeed.DeepSpeedEngine"):
    """Around ``engine.load_checkpoint``: after a ZeRO-3 universal load (fact 19) each param group gets back its own
    ``weight_decay`` and its own ``step`` tensor. The groups' other hyperparameters are alike (the learning rate is
    the scheduler's), so the first group's are right for all. Elsewhere it does nothing."""
    if not (engine.load_universal_checkpoint() and engine.zero_optimization_partition_weights()):
        yield
        return
    kept = [group["weight_decay"] for group in engine.optimizer.param_groups]
    yield
    for group, weight_decay in zip(engine.optimizer.param_groups, kept):
        group["weight_decay"] = weight_decay
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def load_sets_module_from_master(engine: "deepspeed.DeepSpeedEngine") -> bool:
    """Whether ``engine.load_checkpoint`` sets the module's parameters from the loaded fp32 master instead of the
    checkpoint's module weights: a universal load below ZeRO-3 (``update_lp_params``)."""
    return engine.load_universal_checkpoint() and not engine.zero_optimization_partition_weights()


# Keyword arguments for ``PreTrainedModel.activation_checkpointing_enable`` that work under every ZeRO stage: the
# non-reentrant default fails under ZeRO-3 ("A different number of tensors was saved during the original forward
# and recomputation"), plain AdamW and trainable parameters too.
ACTIVATION_CHECKPOINTING_KWARGS = {"use_reentrant": True}


def skip_shm_comm_build() -> None:
    """Skip the 40 s JIT build of the ``deepspeed_shm_comm`` op on CPU (only inference all-reduce uses it)."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def purge_tensorboard_from_step(engine: "deepspeed.DeepSpeedEngine", step: int) -> bool:
    """Make TensorBoard discard the events of earlier processes with a step ``>= step`` (rank 0; elsewhere a no-op).

    This is torch's ``SummaryWriter(purge_step=step)`` applied to the writer DeepSpeed's monitor created at
    ``initialize``: closing it and setting ``purge_step`` makes the writer open a new event file that starts with
    ``Event(step, file_version="brain.Event:2")`` and ``Event(step, session_log=START)``. Readers that honour the
    START event (``EventAccumulator``, ``tensorboard --load_fast=false``) then drop every earlier event, of every
    tag, whose step is ``>= step``; TensorBoard's default fast loader ignores it but drops, per tag, earlier points
    at or after each re-written step. Returns whether there was a writer to purge through.
    """
    tb_monitor = engine.monitor.tb_monitor
    writer = tb_monitor.summary_writer if tb_monitor is not None else None
    if writer is None:
        return False
    writer.close()
    writer.purge_step = step
    writer._get_file_writer()  # opens the new event file and writes the two purge events into it
    writer.flush()
    return True


def csv_monitor_files(engine: "deepspeed.DeepSpeedEngine") -> tuple[list[Path], list[str]] | None:
    """The CSV files of DeepSpeed's csv monitor and its list of files that have their header (rank 0); None when the
    monitor is off or on other ranks.

    ``csvMonitor.write_events`` appends ``step,value`` rows to ``<output_path>/<job_name>/<tag>.csv`` (``/`` and
    spaces in the tag become ``_``), after a ``step,<last part of the tag>`` header row the first time *its process*
    writes that tag, i.e. the file stem is not yet in ``csvMonitor.filenames``: appending a stem there keeps a
    resumed process from repeating the header.
    """
    csv_monitor = engine.monitor.csv_monitor
    if csv_monitor is None or not csv_monitor.enabled or csv_monitor.log_dir is None:
        return None
    return sorted(Path(csv_monitor.log_dir).glob("*.csv")), csv_monitor.filenames


def zero2_estimate(total_params: int, num_gpus_per_node: int, num_nodes: int = 1) -> int:
    """Per-GPU bytes of model states that DeepSpeed's ZeRO-2 estimator gives without offload (fact 16): fp16
    weights whole, 18 bytes per parameter (fp16 and fp32 gradients, fp32 master, two moments) partitioned."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, gpu = estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node, num_nodes, cpu_offload=False)
    return gpu


def zero3_estimate(total_params: int, largest_layer_params: int, num_gpus_per_node: int, num_nodes: int = 1) -> int:
    """Per-GPU bytes of model states that DeepSpeed's ZeRO-3 estimator gives without offload, model built under
    ``zero.Init`` (fact 16): 18 bytes per parameter partitioned plus 4 bytes per parameter of the largest layer."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu, _ = estimate_zero3_model_states_mem_needs(total_params, largest_layer_params, num_gpus_per_node,
                                                      num_nodes, cpu_offload=False, cpu_offload_params=False,
                                                      zero_init=True)
    return gpu
