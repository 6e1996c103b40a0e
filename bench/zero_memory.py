"""Measured per-rank memory of model states under ZeRO-1 and ZeRO-3 (2 CPU ranks, fp16) against the memory plan.

    python bench/zero_memory.py [--out DIR]      (from the repository root; about a minute on 2 cores)

Checks ``ds_orthoadam.memory_plan.model_states`` (and DeepSpeed's estimators beside it) on a scaled-down Llama
(hidden 256, 4 layers, vocabulary 8192: 7.4M parameters) trained with DeepSpeed's real fp16 ZeRO machinery on the
CPU (``tests/fp16_on_cpu`` makes the CPU accelerator accept fp16; the kernels differ from a GPU's, the buffers do
not). How it is measured: on each rank, the bytes of every distinct tensor storage reachable from Python (``gc``;
parameters, gradients, DeepSpeed's flat partitions and buckets, optimiser state), taken at the larger of two points of
the second step: right after ``engine.backward`` (gradients reduced, activations freed) and at the start of the
inner optimiser's ``step`` (DeepSpeed's fp32 gradient partition exists). Buckets are hidden^2 elements, as in the
3b/7b configs. The ZeRO-3 model is built under ``zero.Init`` (``models.build_partitioned_model``), as the trainer
does. Both stages run in the same two processes, one after the other; each is measured above what was live
before it was built.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = "llama-tiny"
SHAPE = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4}
VOCAB = 8192
SEQ_LEN, MICRO_BATCH = 32, 2
STAGES = (1, 3)


def ds_config(stage: int) -> dict:
    """fp16 AdamW at ``stage`` with the 3b/7b configs' bucket rule (hidden^2) scaled to this model."""
    hidden = SHAPE["hidden_size"]
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": hidden**2}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(0.9 * hidden**2), stage3_param_persistence_threshold=10 * hidden)
    return {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
            "zero_optimization": zero, "steps_per_print": 10**9,
            "fp16": {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000, "hysteresis": 1}}


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor the garbage collector can see in this process."""
    import torch

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())


def _measure_stage(stage: int, rank: int) -> dict:
    """Build, train two steps and measure one ZeRO stage in this process (live bytes above what was live before)."""
    import deepspeed
    import torch

    import ds_orthoadam
    from ds_orthoadam import ds_internals, models
    from ds_orthoadam.memory_plan import largest_layer_params

    baseline = live_tensor_bytes()  # what an earlier stage left behind in this process
    config = ds_config(stage)
    torch.manual_seed(0)
    kwargs = dict(attention="softmax1", vocab_size=VOCAB, max_seq_len=SEQ_LEN, **SHAPE)
    model = (models.build_partitioned_model(config, MODEL, **kwargs) if stage == 3
             else ds_orthoadam.build_model(MODEL, **kwargs))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    inner = ds_internals.inner_optimizer(engine)
    peaks = {}
    inner_step = inner.step

    def measured_step(*args, **kwargs):
        peaks["in_step"] = live_tensor_bytes() - baseline
        return inner_step(*args, **kwargs)

    inner.step = measured_step
    generator = torch.Generator().manual_seed(rank)
    for step in range(2):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ_LEN), generator=generator)
        engine.backward(engine(input_ids=tokens, labels=tokens).loss)
        if step == 1:
            peaks["after_backward"] = live_tensor_bytes() - baseline
        engine.step()
    inner.step = inner_step
    meta = models.build_meta_model(MODEL, **kwargs)
    return {"stage": stage, "rank": rank, "params": models.count_parameters(meta),
            "largest_layer": largest_layer_params(meta), **peaks}


def worker(out: Path) -> None:
    """One rank: each stage in turn; rank r writes ``out/rank{r}.json``."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    records = []
    for stage in STAGES:
        records.append(_measure_stage(stage, rank))
        gc.collect()
    (out / f"rank{rank}.json").write_text(json.dumps(records))


def measure(out: Path) -> list[dict]:
    """Launch the 2-rank run (deepspeed launcher, CPU) and return every rank's records, ordered by stage."""
    from ds_orthoadam.distributed import free_port

    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests" / "fp16_on_cpu"),
                                          *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(free_port()), str(Path(__file__).resolve()), "--worker", "--out", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise RuntimeError(f"the 2-rank run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    records = [record for path in sorted(out.glob("rank*.json")) for record in json.loads(path.read_text())]
    return sorted(records, key=lambda record: (record["stage"], record["rank"]))


def report(records: list[dict]) -> str:
    """Measured per-rank bytes against the plan's model states and DeepSpeed's estimate (MiB)."""
    from ds_orthoadam.memory_plan import deepspeed_estimate, model_states

    lines = ["| ZeRO | rank | measured peak | plan (model states) | measured / plan | DeepSpeed's estimate |"
             " measured / estimate |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for record in records:
        world, stage = 2, record["stage"]
        measured = max(record["after_backward"], record["in_step"])
        planned = model_states(record["params"], stage, world, record["largest_layer"]).total
        estimate = deepspeed_estimate(record["params"], stage, world, record["largest_layer"])
        lines.append(f"| {stage} | {record['rank']} | {measured / 2**20:.2f} | {planned / 2**20:.2f} | "
                     f"{measured / planned:.3f} | {estimate / 2**20:.2f} | {measured / estimate:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-zero-memory"), help="per-rank records")
    parser.add_argument("--json", action="store_true", help="print the per-rank records as JSON instead")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    args = parser.parse_args()
    if args.worker:
        worker(args.out)
        return
    records = measure(args.out)
    if args.json:
        print(json.dumps(records))
        return
    print(f"{MODEL} {SHAPE}, vocabulary {VOCAB}: {records[0]['params']} parameters, 2 CPU ranks, fp16")
    print(report(records))


if __name__ == "__main__":
    main()
