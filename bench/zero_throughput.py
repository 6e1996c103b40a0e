"""Training throughput of one optimiser inside DeepSpeed (random tokens; launched by bench/gpu_zero.sh).

    deepspeed --num_gpus 1 bench/zero_throughput.py --optimizer OrthoAdam --rotation hadamard --model llama-130m

Prints one line ``RESULT optimizer=... model=... tokens_per_s=... skipped_steps=... final_loss=...`` (rank 0). The config is
fp16 with dynamic loss scaling (initial scale 2^16) and ZeRO stage 1; only the optimiser name differs between runs.
"""
from __future__ import annotations

import argparse
import time

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator

import ds_orthoadam
from ds_orthoadam import ds_internals
from ds_orthoadam.rotations import ROTATION_KINDS

SEQ_LEN = 256
WARMUP_STEPS = 5


def config(optimizer: str, micro_batch: int, precision: str, rotation: str) -> dict:
    params = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True}
    if optimizer == "OrthoAdam":
        params["rotation"] = rotation
    precision_section = ({"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}}
                         if precision == "fp16" else {"bf16": {"enabled": precision == "bf16"}})
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "zero_optimization": {"stage": 1}, "steps_per_print": 10**9,
            "optimizer": {"type": optimizer, "params": params}, **precision_section}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", choices=["AdamW", "OrthoAdam"], required=True)
    parser.add_argument("--model", default="llama-130m")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--micro-batch", type=int, default=64, help="sequences of 256 tokens per rank per step")
    parser.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--rotation", choices=ROTATION_KINDS, default="hadamard", help="OrthoAdam's rotation kind")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    ds_internals.skip_shm_comm_build()  # CPU runs only: skips a 40 s JIT build of an op training never uses
    deepspeed.init_distributed()
    torch.manual_seed(0)
    model = ds_orthoadam.build_model(args.model)
    engine, *_ = ds_orthoadam.initialize(model=model, model_parameters=model.parameters(),
                                         config=config(args.optimizer, args.micro_batch, args.precision, args.rotation))
    generator = torch.Generator().manual_seed(1 + dist.get_rank())
    accelerator = get_accelerator()
    start, loss = None, None
    for step in range(args.steps):
        if step == WARMUP_STEPS:
            accelerator.synchronize()
            start = time.perf_counter()
        tokens = torch.randint(0, model.config.vocab_size, (args.micro_batch, SEQ_LEN), generator=generator)
        tokens = tokens.to(engine.device)
        loss = engine(input_ids=tokens, labels=tokens).loss
        engine.backward(loss)
        engine.step()
    accelerator.synchronize()
    elapsed = time.perf_counter() - start
    tokens_per_s = (args.steps - WARMUP_STEPS) * args.micro_batch * SEQ_LEN * dist.get_world_size() / elapsed
    if dist.get_rank() == 0:
        name = f"{args.optimizer}-{args.rotation}" if args.optimizer == "OrthoAdam" else args.optimizer
        print(f"RESULT optimizer={name} model={args.model} precision={args.precision} "
              f"micro_batch={args.micro_batch} steps={args.steps} tokens_per_s={tokens_per_s:.0f} "
              f"skipped_steps={engine.skipped_steps} final_loss={loss.item():.4f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
