"""Find the blocks and attention modules of any transformers causal LM and stream their outputs to a callback.

Every transformers 5 model declares in ``_can_record_outputs`` which module produces the ``hidden_states`` (the
decoder block) and which the ``attentions`` (with the tuple index of the weights). ``output_hidden_states=True`` is
*not* used on purpose: transformers replaces its last entry by the final-norm output, which is not the residual
stream, and it keeps every layer's tensors alive until the forward returns. Forward hooks see one layer at a time.

Attention weights only exist on an eager path. ``eager_attention`` switches the model to one for the duration of a
measurement and restores the original implementation afterwards; a softmax-1 model is switched to
``softmax1_eager`` so that what is measured is still softmax-1.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils.output_capturing import OutputRecorder

from ds_orthoadam.analysis.errors import AnalysisInputError
from ds_orthoadam.attention import SOFTMAX1_EAGER

# Implementations that compute ordinary softmax attention (some without returning the weights); "eager" is their
# weight-returning equivalent. Anything else is a custom attention that "eager" would silently replace.
_SOFTMAX_IMPLEMENTATION_MARKERS = ("eager", "sdpa", "flash", "flex")


@dataclass(frozen=True)
class ModelParts:
    """The decoder blocks (residual-stream producers) in layer order and their attention modules."""

    blocks: list[nn.Module]
    attentions: list[nn.Module]
    attention_weights_index: int


def _recorder(spec, default_index: int) -> OutputRecorder:
    """Normalise a ``_can_record_outputs`` entry the way transformers does (class, class-name string or recorder)."""
    if isinstance(spec, list):
        spec = spec[0]
    if isinstance(spec, OutputRecorder):
        return spec
    if isinstance(spec, str):
        return OutputRecorder(target_class=None, index=default_index, class_name=spec)
    return OutputRecorder(target_class=spec, index=default_index)


def _matching_modules(model: nn.Module, recorder: OutputRecorder) -> list[nn.Module]:
    found = []
    for name, module in model.named_modules():
        dotted = f".{name}."
        by_class = recorder.target_class is not None and isinstance(module, recorder.target_class)
        by_name = recorder.class_name is not None and dotted.rstrip(".").endswith(recorder.class_name)
        if not (by_class or by_name):
            continue
        if recorder.layer_name is not None and f".{recorder.layer_name.strip('.')}." not in dotted:
            continue
        found.append(module)
    return found


def num_layers(model: PreTrainedModel) -> int:
    """Number of decoder blocks according to the (text) config."""
    return model.config.get_text_config().num_hidden_layers


def locate_parts(model: PreTrainedModel) -> ModelParts:
    """The blocks and attention modules of ``model``, found through its ``_can_record_outputs`` declaration."""
    declared = getattr(type(model), "_can_record_outputs", None) or {}
    if "hidden_states" not in declared or "attentions" not in declared:
        raise AnalysisInputError(
            f"{type(model).__name__} does not declare its decoder blocks and attention modules "
            "(transformers' _can_record_outputs); only transformers causal LMs with that declaration can be analysed"
        )
    blocks = _matching_modules(model, _recorder(declared["hidden_states"], 0))
    attention_recorder = _recorder(declared["attentions"], 1)
    attentions = _matching_modules(model, attention_recorder)
    expected = num_layers(model)
    if len(blocks) != expected or len(attentions) != expected:
        raise AnalysisInputError(
            f"{type(model).__name__}: found {len(blocks)} blocks and {len(attentions)} attention modules for "
            f"num_hidden_layers={expected}; this architecture is not supported by the analysis"
        )
    return ModelParts(blocks, attentions, attention_recorder.index)


def weight_returning_implementation(implementation: str | None) -> str:
    """The attention implementation that computes the same attention as ``implementation`` and returns weights."""
    implementation = implementation or "eager"
    if implementation.startswith("softmax1"):
        return SOFTMAX1_EAGER
    if any(marker in implementation for marker in _SOFTMAX_IMPLEMENTATION_MARKERS):
        return "eager"
    raise AnalysisInputError(
        f"attention implementation {implementation!r} is neither softmax nor softmax-1, so its weights cannot be "
        "measured on an eager path; load the model with attn_implementation='eager' or 'softmax1_eager'"
    )


@contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """Run ``model`` with a weight-returning attention of the same kind inside the block; restore it afterwards."""
    original = model.config._attn_implementation
    target = weight_returning_implementation(original)
    if target != original:
        model.set_attn_implementation(target)
    try:
        yield
    finally:
        if target != original:
            model.set_attn_implementation(original)


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` and ``torch.no_grad()`` inside the block; the previous training mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


HiddenCallback = Callable[[int, torch.Tensor], None]
AttentionCallback = Callable[[int, torch.Tensor], None]


@contextmanager
def stream_layer_outputs(
    model: PreTrainedModel,
    on_hidden: HiddenCallback | None = None,
    on_attention: AttentionCallback | None = None,
) -> Iterator[ModelParts]:
    """Call ``on_hidden(layer, X[B, T, D])`` and ``on_attention(layer, P[B, H, T, S])`` during every forward.

    Attention weights are only available on an eager path; combine with ``eager_attention``. The hooks are removed
    when the block exits, also on error.
    """
    parts = locate_parts(model)
    handles = []

    def hidden_hook(layer: int):
        def hook(module, args, output):
            on_hidden(layer, output[0] if isinstance(output, tuple) else output)

        return hook

    def attention_hook(layer: int):
        def hook(module, args, output):
            weights = output[parts.attention_weights_index] if isinstance(output, tuple) else None
            if weights is None:
                raise AnalysisInputError(
                    f"attention layer {layer} returned no weights (implementation "
                    f"{model.config._attn_implementation!r}); wrap the forward in eager_attention(model)"
                )
            on_attention(layer, weights)

        return hook

    try:
        for layer, (block, attention) in enumerate(zip(parts.blocks, parts.attentions)):
            if on_hidden is not None:
                handles.append(block.register_forward_hook(hidden_hook(layer)))
            if on_attention is not None:
                handles.append(attention.register_forward_hook(attention_hook(layer)))
        yield parts
    finally:
        for handle in handles:
            handle.remove()
