"""Per-GPU memory plan of the large zoo sizes on V100s under ZeRO-1/2/3 (the tables of docs/zero3.md).

    python -m ds_orthoadam.memory_plan [--models llama-7b ...] [--gpus 8 16 32]

prints, for each model and number of GPUs, what one GPU holds in mixed-precision (fp16 + fp32 master) Adam training:

* model states, split as DeepSpeed's own estimators count them (``stage_1_and_2.py``: "2 = params_16bit, 18 =
  2_grads_16bit + 4_grads_32bit + 4_params_32bit + 8_optimizer_states_32bit"): fp16 weights (whole at ZeRO-1/2, a
  1/N partition at ZeRO-3), gradients (fp16 whole at ZeRO-1, partitioned from ZeRO-2, plus the fp32 gradient
  partition the step makes), optimiser state (fp32 master and two moments, partitioned at every stage), and at
  ZeRO-3 the gathered working set (4 bytes per parameter of the largest layer, DeepSpeed's term);
* DeepSpeed's estimate for the same configuration (:func:`ds_orthoadam.ds_internals.zero2_estimate` for ZeRO-1/2,
  which counts ZeRO-2's partitioned gradients, and :func:`ds_orthoadam.ds_internals.zero3_estimate`);
* OrthoAdam's rotations, replicated on every rank at every stage (docs/deepspeed.md), Hadamard and dense, from
  the rotations the optimiser builds (:func:`rotation_bytes`);
* activations at the config's micro-batch and sequence length 256 without and with activation checkpointing, from
  the analytic count in :func:`activation_bytes` (an estimate: not measured on a GPU).

Why a module and not a hand-typed table: the doc's numbers are regenerated from the zoo, the configs and
DeepSpeed's estimators whenever one of them changes.
"""
from __future__ import annotations

import argparse
import collections
from dataclasses import dataclass

from ds_orthoadam import ds_internals, run_config
from ds_orthoadam.models import DEFAULT_SEQ_LEN, MODEL_SPECS, build_meta_model, count_parameters
from ds_orthoadam.rotations import DEFAULT_MAX_DENSE_DIM, DEFAULT_MAX_ROTATED_DIM, make_rotation

PLAN_MODELS = ("llama-1.4b", "llama-3b", "llama-7b", "gpt2-1.4b", "gpt2-3b", "gpt2-7b")
GPU_COUNTS = (8, 16, 32)
GPUS_PER_NODE = 8
V100_BYTES = 32 * 2**30
# What a plan may use of it: 4 GiB are left for the CUDA context, DeepSpeed's communication buckets and allocator
# fragmentation (a choice, not measured here).
BUDGET_BYTES = V100_BYTES - 4 * 2**30
STAGES = (1, 2, 3)
GIB = 2**30
# Bytes per parameter of mixed-precision Adam: (whole on every rank, partitioned 1/N) per component and ZeRO stage.
_WEIGHTS = {1: (2, 0), 2: (2, 0), 3: (0, 2)}
_GRADIENTS = {1: (2, 4), 2: (0, 6), 3: (0, 6)}  # fp16 gradient + the step's fp32 gradient partition
_OPTIMIZER = (0, 12)  # fp32 master + exp_avg + exp_avg_sq


@dataclass(frozen=True)
class ModelStates:
    """Bytes of model states on one GPU."""

    weights: int
    gradients: int
    optimizer: int
    gathered: int  # ZeRO-3's working set of gathered parameters (DeepSpeed's 4 x largest layer)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.gathered


def _bytes(per_param: tuple[int, int], params: int, world: int) -> int:
    whole, partitioned = per_param
    return whole * params + partitioned * params // world


def model_states(params: int, stage: int, world: int, largest_layer: int = 0) -> ModelStates:
    """Model states of ``params`` parameters on one of ``world`` GPUs at ZeRO ``stage`` (1, 2 or 3)."""
    return ModelStates(weights=_bytes(_WEIGHTS[stage], params, world),
                       gradients=_bytes(_GRADIENTS[stage], params, world),
                       optimizer=_bytes(_OPTIMIZER, params, world),
                       gathered=4 * largest_layer if stage == 3 else 0)


def deepspeed_estimate(params: int, stage: int, world: int, largest_layer: int) -> int:
    """DeepSpeed's estimator for the stage (its ZeRO-2 one for ZeRO-1 too), ``world`` GPUs in nodes of 8."""
    per_node, nodes = min(world, GPUS_PER_NODE), max(1, world // GPUS_PER_NODE)
    if stage == 3:
        return ds_internals.zero3_estimate(params, largest_layer, per_node, nodes)
    return ds_internals.zero2_estimate(params, per_node, nodes)


def largest_layer_params(model) -> int:
    """DeepSpeed's "largest layer" (``stage3.model_to_params``): most parameters held directly by one module."""
    return max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())


def _axis_bytes(length: int, kind: str) -> int:
    """Bytes of OrthoAdam's rotation of one axis: a dense Haar axis up to ``max_dense_dim`` is an fp32 n x n matrix
    (built without its QR here: the matrix alone is what it holds); every other axis as the optimiser builds it."""
    if kind == "dense" and 1 < length <= DEFAULT_MAX_DENSE_DIM:
        return 4 * length * length
    if length > DEFAULT_MAX_ROTATED_DIM:
        return 0
    return make_rotation((length,), kind, 0, "axis").nbytes


def rotation_bytes(model, kind: str) -> int:
    """Bytes of OrthoAdam's rotations of every parameter of ``model`` (default settings), which each rank holds."""
    shapes = collections.Counter(tuple(p.shape) for p in model.parameters())
    return sum(count * sum(_axis_bytes(n, kind) for n in shape) for shape, count in shapes.items())


def activation_bytes(name: str, micro_batch: int, seq_len: int = DEFAULT_SEQ_LEN, checkpointing: bool = False) -> int:
    """Analytic fp16 activations saved for backward by one micro-batch (fused attention: no T x T matrix).

    Per token and layer (bytes, h hidden, i MLP width), counting what autograd keeps: GPT2 16h + 10i (two LayerNorm
    inputs 4h, QKV input, q/k/v and attention output 10h, MLP input 2h; transformers' ``gelu_new`` is composed of
    torch ops and keeps its input, tanh output, 0.5 x and 1 + tanh, and c_proj keeps its output: 10i; Korthikanti
    et al. 2022 count 4i for a fused GeLU); Llama 24h + 8i (two RMSNorms with their fp32 upcast 12h, attention 10h,
    MLP input 2h, gate, SiLU output, up and product 8i). Plus the head: final norm 2h and fp16 logits upcast to fp32
    for the loss, 6 bytes per vocabulary entry. With activation checkpointing each layer keeps only its fp16 input
    (2h) and one layer's activations are live again during its backward.
    """
    spec = MODEL_SPECS[name]
    h, i = spec.hidden, spec.intermediate
    per_layer = 16 * h + 10 * i if spec.family == "gpt2" else 24 * h + 8 * i
    head = 2 * h + 6 * spec.vocab_size
    layers = spec.layers * 2 * h + per_layer if checkpointing else spec.layers * per_layer
    return micro_batch * seq_len * (layers + head)


@dataclass(frozen=True)
class PlanRow:
    """One line of the plan: a model on ``gpus`` GPUs at one ZeRO stage."""

    model: str
    gpus: int
    stage: int
    states: ModelStates
    estimate: int
    rotations_hadamard: int
    rotations_dense: int
    micro_batch: int
    activations: int
    activations_checkpointed: int

    def total(self, checkpointing: bool) -> int:
        """Model states + Hadamard rotations + activations: what the configured OrthoAdam run holds per GPU."""
        activations = self.activations_checkpointed if checkpointing else self.activations
        return self.states.total + self.rotations_hadamard + activations


def plan(models=PLAN_MODELS, gpu_counts=GPU_COUNTS) -> list[PlanRow]:
    """Every (model, GPUs, stage) row; the micro-batch is the one in the model's ``ds_configs`` file."""
    rows = []
    for name in models:
        model = build_meta_model(name)
        params, largest = count_parameters(model), largest_layer_params(model)
        hadamard, dense = rotation_bytes(model, "hadamard"), rotation_bytes(model, "dense")
        micro = run_config.read_json(run_config.default_ds_config_path(name))["train_micro_batch_size_per_gpu"]
        for gpus in gpu_counts:
            for stage in STAGES:
                rows.append(PlanRow(name, gpus, stage, model_states(params, stage, gpus, largest),
                                    deepspeed_estimate(params, stage, gpus, largest), hadamard, dense, micro,
                                    activation_bytes(name, micro), activation_bytes(name, micro, checkpointing=True)))
    return rows


def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def markdown(rows: list[PlanRow]) -> str:
    """The plan as one markdown table per model (GiB per GPU)."""
    lines = []
    for name in dict.fromkeys(row.model for row in rows):
        mine = [row for row in rows if row.model == name]
        lines += [f"\n**{name}** (micro-batch {mine[0].micro_batch} x {DEFAULT_SEQ_LEN} tokens; rotations per GPU:"
                  f" Hadamard {_gib(mine[0].rotations_hadamard)}, dense {_gib(mine[0].rotations_dense)}; activations"
                  f" {_gib(mine[0].activations)}, with checkpointing {_gib(mine[0].activations_checkpointed)})\n",
                  "| GPUs | ZeRO | weights | gradients | optimiser | gathered | model states | DeepSpeed's estimate "
                  "| total | total, checkpointing | fits 28 GiB |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row in mine:
            s = row.states
            fits = ("yes" if row.total(False) <= BUDGET_BYTES else
                    "with checkpointing" if row.total(True) <= BUDGET_BYTES else "no")
            lines.append(f"| {row.gpus} | {row.stage} | {_gib(s.weights)} | {_gib(s.gradients)} | {_gib(s.optimizer)} "
                         f"| {_gib(s.gathered)} | {_gib(s.total)} | {_gib(row.estimate)} | {_gib(row.total(False))} "
                         f"| {_gib(row.total(True))} | {fits} |")
    return "\n".join(lines).lstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(PLAN_MODELS), choices=sorted(MODEL_SPECS),
                        help="zoo models to plan (default: the 1.4B, 3B and 7B of both families)")
    parser.add_argument("--gpus", nargs="+", type=int, default=list(GPU_COUNTS), help="numbers of GPUs (8 per node)")
    args = parser.parse_args(argv)
    print(markdown(plan(args.models, args.gpus)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
