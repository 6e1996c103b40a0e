"""2-rank worker for tests/test_zero_orthoadam.py (run with ``deepspeed --num_gpus 2 tests/zero_worker.py``).

Runs several cases in one launch (DeepSpeed start-up dominates on CPU). A case is
``family:stage:precision:optimizer[:option]``: precision fp32, bf16 or fp16 (DeepSpeed's fp16 machinery on the CPU,
through tests/fp16_on_cpu on PYTHONPATH), option ``save10`` (checkpoint at step 10, run on to 20), ``resume10``
(load that checkpoint in this new process, run steps 10..19), ``overflow7`` (an inf loss on rank 0 at step 7:
DeepSpeed must skip the step; with fp16 its dynamic loss scaler also halves the scale), ``overlap``
(``zero_optimization.overlap_comm``), ``ckpt`` (activation checkpointing as the trainer enables it) or ``accum32``
(bf16 with ``data_types.grad_accum_dtype`` fp32: DeepSpeed's BF16_Optimizer). Rank 0 writes ``<out>/<case>.pt`` with the final real weights and facts the test checks (skipped
steps, loss scale per step, memory, state around the skipped step, rotations applied per optimiser step).
"""
from __future__ import annotations

import argparse
import os
import time

import deepspeed
import torch
import deepspeed.comm as dist
from deepspeed.utils import safe_get_full_optimizer_state

import ds_orthoadam
from ds_orthoadam import ds_internals
from ds_orthoadam.train import enable_activation_checkpointing
from zero_harness import GRAD_ACCUM, STEPS, ds_config, loss_of, micro_batch, tiny_model


def module_weights(engine) -> dict:
    """The module's whole weights: under ZeRO-3 as ``GatheredParameters`` yields them (what an export reads)."""
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()),
                                           enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def snapshot(engine) -> dict:
    """Everything a skipped step must leave unchanged: module weights, fp32 master, moments and step counts."""
    inner = ds_internals.inner_optimizer(engine)
    return {
        "module": module_weights(engine),
        "master": [p.detach().clone() for group in inner.param_groups for p in group["params"]],
        "state": [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for s in inner.state.values()],
        "exp_avg_full": {n: safe_get_full_optimizer_state(p, "exp_avg").clone()
                         for n, p in engine.module.named_parameters()},
    }


def count_rotate_calls(engine) -> list[int]:
    """A one-element counter of ``Q x`` applications (gradients, and parameters at fp32 stage 0) from now on."""
    counter = [0]
    frame = getattr(engine, "orthoadam_frame", None)
    for rotation in (frame.rotations.values() if frame is not None else ()):
        def counted(x, workspace=None, _rotate=rotation.rotate):
            counter[0] += 1
            return _rotate(x, workspace)
        rotation.rotate = counted
    return counter


def run_case(case: str, out_dir: str, rank: int) -> None:
    family, stage, precision, optimizer, *option = case.split(":")
    option, facts = (option[0] if option else ""), {}
    model = tiny_model(family)
    config = ds_config(int(stage), optimizer, precision)
    if stage == "3" and family == "llama":  # every parameter released after use: the fetch/prefetch gathers
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # (gpt2: all persistent, the default)
    if option == "overlap":
        config["zero_optimization"]["overlap_comm"] = True
    if option == "accum32":
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if option == "ckpt":  # the trainer's --activation-checkpointing: every layer recomputed (and re-gathered)
        enable_activation_checkpointing(model)
        model.train()
        config["zero_optimization"]["stage3_max_reuse_distance"] = 0  # released after each use: re-gathered
    engine, _, _, _ = ds_orthoadam.initialize(model=model, model_parameters=model.parameters(), config=config)
    hooks = getattr(engine, "orthoadam_hooks", None)
    if hooks is not None:
        facts["rotates_once_per_step"] = hooks.rotates_once_per_step
        facts["master_copy"] = hooks.master_copy
        facts["rotated_params"] = len(engine.orthoadam_frame.params)
    rotate_calls, facts["rotate_calls_per_step"] = count_rotate_calls(engine), []
    checkpoint_dir = os.path.join(out_dir, f"ckpt-{family}" + ("-zero3" if stage == "3" else ""))
    first_step = 0
    if option == "resume10":
        load_path, client_state = engine.load_checkpoint(checkpoint_dir, tag="step10")
        assert load_path is not None, checkpoint_dir
        first_step = client_state["next_step"]
        facts["client_state"] = client_state
        facts["weights_after_load"] = module_weights(engine)
    for step in range(first_step, STEPS):
        if option == "save10" and step == 10:
            engine.save_checkpoint(checkpoint_dir, tag="step10", client_state={"next_step": 10})
            facts["weights_at_save"] = module_weights(engine)
        overflow = option == "overflow7" and step == 7
        if overflow:
            facts["before_skip"] = snapshot(engine)
        calls_before = rotate_calls[0]
        for micro in range(GRAD_ACCUM):
            loss = loss_of(engine, micro_batch(step, micro, rank).to(engine.device))
            if overflow and rank == 0 and micro == 1:
                loss = loss * float("inf")
            engine.backward(loss)
            engine.step()
        facts["rotate_calls_per_step"].append(rotate_calls[0] - calls_before)
        if overflow:
            facts["after_skip"] = snapshot(engine)
            facts["step_applied_at_skip"] = engine.was_step_applied()
        if engine.fp16_enabled():
            facts.setdefault("loss_scale_per_step", []).append(float(engine.optimizer.loss_scale))
    facts["skipped_steps"] = engine.skipped_steps
    inner = ds_internals.inner_optimizer(engine)
    facts["moment_bytes_this_rank"] = sum(v.numel() * v.element_size() for s in inner.state.values()
                                          for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    facts["param_numel"] = sum(p.numel() for p in engine.module.parameters())
    facts["rotation_nbytes"] = getattr(getattr(engine, "orthoadam_frame", None), "nbytes", 0)
    facts["persistent_params"] = len(getattr(engine.optimizer, "persistent_parameters", ()))  # ZeRO-3: never released
    facts["final"] = module_weights(engine)
    all_moment_bytes = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(all_moment_bytes, facts["moment_bytes_this_rank"])
    facts["moment_bytes_per_rank"] = all_moment_bytes
    if rank == 0:
        torch.save(facts, os.path.join(out_dir, f"{case.replace(':', '_')}.pt"))
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", nargs="+", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    ds_internals.skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    for case in args.cases:
        start = time.perf_counter()
        run_case(case, args.out, dist.get_rank())
        print(f"[zero_worker] {case}: {time.perf_counter() - start:.1f} s", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
