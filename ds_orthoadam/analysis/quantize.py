"""Round-to-nearest (RTN) fake quantisation of a model's linear layers, for quantised-perplexity measurements.

Quantised: every ``nn.Linear`` and GPT2 ``Conv1D`` (GPT2's linear layer, weight stored [in, out]) except the output
embedding (LM head), i.e. the attention q/k/v/o and MLP projections of every block. Left in full precision: token and
position embeddings, the LM head (tied to the token embedding in GPT2), norms, every bias, the attention score and
weighted-sum products (activation x activation), rotary embeddings and residual additions.

Weight quantisers work on the [out, in] view of the weight, in groups:

* ``tensor``: one scale for the whole matrix; ``channel``: one per output channel (row); ``group``: one per
  ``group_size`` consecutive input channels of a row (a ragged last group keeps its own scale).
* ``symmetric`` (absmax): scale = max|w| / (2^(b-1) - 1), q = clamp(round(w / scale), -(2^(b-1) - 1), 2^(b-1) - 1).
* asymmetric (min-max): scale = (max - min) / (2^b - 1), zero point z = round(-min / scale),
  q = clamp(round(w / scale) + z, 0, 2^b - 1), w' = (q - z) * scale. A constant group is kept as it is.

W8A8 adds 8-bit absmax fake quantisation of every quantised layer's input activations, per tensor (``tensor``) or
per token (``token``); its weights are 8-bit symmetric per output channel. The per-tensor scale is dynamic, one per
*sequence*: the absmax of that sequence's input to the layer over its real tokens (the ``attention_mask``), i.e. the
tensor the layer sees when the sequence is run alone. Why per sequence: one scale per forward call made a sequence's
result depend on which sequences shared its batch (an audit saw one sequence's error go from 0.019 alone to 1.95
batched with a sequence holding an outlier), so the perplexity changed with ``--batch-size``; with one scale per
sequence it does not, nor with padding. Static scales calibrated on held-out batches would also be batch-independent, but need a
calibration split and choices (how many batches, max or percentile) that the paper does not specify; a dynamic scale
per sequence needs neither and is what batch-1 inference with per-tensor dynamic quantisation does.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ds_orthoadam.analysis.errors import AnalysisInputError

# The scheme comparable with the paper's 4-bit penalty (Kaul et al.: weight-only, 4-bit, "basic" round-to-nearest,
# linear layers only, see PAPER.md). The paper names no grouping; plain RTN without refinements is taken as one
# absmax scale per matrix, the scheme in which a single outlier weight sets the step of a whole matrix (what the
# paper's argument is about), and the project's acceptance figures use it. The per-channel and group-wise rows are
# finer schemes the paper does not report.
PAPER_COMPARABLE_SCHEME = "w4-sym-tensor"
WEIGHT_GRANULARITIES = ("tensor", "channel", "group")
ACTIVATION_GRANULARITIES = ("tensor", "token")
DEFAULT_GROUP_SIZE = 128


@dataclass(frozen=True)
class WeightQuantizer:
    """How to round a weight matrix: bit width, absmax (symmetric) or min-max (asymmetric), grouping."""

    bits: int
    symmetric: bool
    granularity: str
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise AnalysisInputError(f"bits must be between 2 and 16, got {self.bits}")
        if self.granularity not in WEIGHT_GRANULARITIES:
            raise AnalysisInputError(
                f"unknown weight granularity {self.granularity!r}; choose one of {', '.join(WEIGHT_GRANULARITIES)}"
            )
        if self.group_size < 1:
            raise AnalysisInputError(f"group_size must be positive, got {self.group_size}")

    @property
    def label(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        grouping = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        return f"{kind}-{grouping}"

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantise a [out, in] matrix (any float dtype); returns the dequantised matrix in the same dtype."""
        grouped, restore = _to_groups(weight.float(), self.granularity, self.group_size)
        if self.symmetric:
            dequantised = absmax_round(grouped, self.bits)
        else:
            dequantised = _minmax_round(grouped, self.bits)
        return restore(dequantised).to(weight.dtype)


def absmax_round(values: torch.Tensor, bits: int, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric RTN (float32 in, float32 out) with the scale of ``absmax`` (default: each last-dimension slice's)."""
    levels = 2 ** (bits - 1) - 1
    scale = (values.abs().amax(dim=-1, keepdim=True) if absmax is None else absmax) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero slice stays zero
    return torch.clamp(torch.round(values / scale), -levels, levels) * scale


def _minmax_round(values: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2**bits - 1
    low = values.amin(dim=-1, keepdim=True)
    high = values.amax(dim=-1, keepdim=True)
    scale = (high - low) / levels
    constant = scale == 0
    scale = torch.where(constant, torch.ones_like(scale), scale)
    zero_point = torch.round(-low / scale)
    quantised = torch.clamp(torch.round(values / scale) + zero_point, 0, levels)
    return torch.where(constant, values, (quantised - zero_point) * scale)


def _to_groups(weight: torch.Tensor, granularity: str, group_size: int):
    """Reshape [out, in] to [..., group] slices; returns the slices and the inverse reshape."""
    rows, cols = weight.shape
    if granularity == "tensor":
        return weight.reshape(1, -1), lambda grouped: grouped.reshape(rows, cols)
    if granularity == "channel":
        return weight, lambda grouped: grouped
    padding = (-cols) % group_size
    # Replicating the row's last column pads the ragged last group without changing its min, max or absmax.
    padded = torch.cat([weight, weight[:, -1:].expand(rows, padding)], dim=1) if padding else weight
    grouped = padded.reshape(rows, -1, group_size)
    return grouped, lambda result: result.reshape(rows, -1)[:, :cols]


def quantize_activations(
    inputs: torch.Tensor, bits: int, granularity: str, valid: torch.Tensor | None = None, per_sequence: bool = False
) -> torch.Tensor:
    """Dynamic absmax fake quantisation of activations [..., features]: one scale per call or per token.

    ``valid`` (boolean, ``inputs.shape[:-1]``) marks the real tokens; the per-tensor scale is taken over those only,
    so padding cannot change it. ``per_sequence``: one per-tensor scale per entry of the leading (batch) dimension
    instead of one for the call, as if every sequence were quantised alone.
    """
    values = inputs.float()
    if granularity == "token":
        return absmax_round(values, bits).to(inputs.dtype)
    if valid is not None and valid.shape != values.shape[:-1]:
        raise AnalysisInputError(f"attention_mask shape {tuple(valid.shape)} does not match the layer input "
                                 f"{tuple(values.shape)}; pass the batch's [batch, seq_len] attention_mask")
    magnitudes = values.abs() if valid is None else torch.where(valid.unsqueeze(-1), values.abs(), 0.0)
    if per_sequence:
        absmax = magnitudes.flatten(1).amax(dim=1).view(-1, *[1] * (values.dim() - 1))
    else:
        absmax = magnitudes.amax()
    return absmax_round(values, bits, absmax).to(inputs.dtype)


@dataclass(frozen=True)
class QuantScheme:
    """A weight quantiser, optionally with activation quantisation (W8A8)."""

    weight: WeightQuantizer
    activation_granularity: str | None = None
    activation_bits: int = 8

    @property
    def family(self) -> str:
        return "weight-only" if self.activation_granularity is None else f"W{self.weight.bits}A{self.activation_bits}"

    @property
    def name(self) -> str:
        if self.activation_granularity is None:
            return f"w{self.weight.bits}-{self.weight.label}"
        return f"w{self.weight.bits}a{self.activation_bits}-{self.activation_granularity}"


def default_schemes(group_size: int = DEFAULT_GROUP_SIZE) -> list[QuantScheme]:
    """Weight-only RTN at 8 and 4 bits (absmax / min-max x tensor / channel / group) plus W8A8 per-tensor/per-token."""
    weight_only = [
        QuantScheme(WeightQuantizer(bits, symmetric, granularity, group_size))
        for bits in (8, 4)
        for symmetric in (True, False)
        for granularity in WEIGHT_GRANULARITIES
    ]
    w8a8 = [
        QuantScheme(WeightQuantizer(8, True, "channel", group_size), activation_granularity=granularity)
        for granularity in ACTIVATION_GRANULARITIES
    ]
    return weight_only + w8a8


def scheme_by_name(name: str, group_size: int = DEFAULT_GROUP_SIZE) -> QuantScheme:
    schemes = {scheme.name: scheme for scheme in default_schemes(group_size)}
    if name not in schemes:
        raise AnalysisInputError(f"unknown quantisation scheme {name!r}; valid schemes: {', '.join(schemes)}")
    return schemes[name]


def quantizable_layers(model: PreTrainedModel) -> dict[str, nn.Module]:
    """Every nn.Linear / Conv1D except the LM head, by name (a weight shared by two layers is listed once)."""
    head = model.get_output_embeddings()
    layers, seen = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head and id(module.weight) not in seen:
            seen.add(id(module.weight))
            layers[name] = module
    return layers


def _matrix_view(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (Conv1D stores [in, out])."""
    return module.weight.data.t() if isinstance(module, Conv1D) else module.weight.data


@contextmanager
def quantized(model: PreTrainedModel, scheme: QuantScheme) -> Iterator[dict[str, nn.Module]]:
    """Fake-quantise ``model``'s linear layers in place inside the block; the exact weights come back afterwards.

    The original weights are kept as a copy on the same device (extra memory: the linear weights once).
    """
    layers = quantizable_layers(model)
    originals = {name: module.weight.data.clone() for name, module in layers.items()}
    handles = []
    try:
        with torch.no_grad():
            for module in layers.values():
                view = _matrix_view(module)
                view.copy_(scheme.weight(view))
        if scheme.activation_granularity is not None:
            handles = _activation_hooks(model, layers, scheme)
        yield layers
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for name, module in layers.items():
                module.weight.data.copy_(originals[name])


def _activation_hooks(
    model: PreTrainedModel, layers: dict[str, nn.Module], scheme: QuantScheme
) -> list[RemovableHandle]:
    """Quantise every layer's input (per-tensor: one scale per sequence); the real tokens are those of the
    ``attention_mask`` keyword that reaches the base model (the transformer without its LM head; a model call passes
    its own mask on)."""
    call: dict[str, torch.Tensor | None] = {"valid": None}

    def remember_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        call["valid"] = None if mask is None else mask.bool()

    def quantize_input(module: nn.Module, args: tuple) -> tuple:
        quantised = quantize_activations(args[0], scheme.activation_bits, scheme.activation_granularity, call["valid"],
                                         per_sequence=True)  # independent of the batch (see the module docstring)
        return (quantised, *args[1:])

    return [model.base_model.register_forward_pre_hook(remember_mask, with_kwargs=True)] + [
        layer.register_forward_pre_hook(quantize_input) for layer in layers.values()
    ]

