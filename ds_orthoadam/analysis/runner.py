"""One model's full analysis: a metric pass (outliers + perplexity in the same forward) and one perplexity pass per
quantisation scheme. Everything is streamed; only one sample's maps (for the plots) are kept."""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ds_orthoadam.analysis.batches import Batch, batch_tensors
from ds_orthoadam.analysis.errors import AnalysisInputError
from ds_orthoadam.analysis.hooks import eager_attention, evaluation_mode, num_layers, stream_layer_outputs
from ds_orthoadam.analysis.metrics import (
    DEFAULT_SINK_EPSILON,
    OutlierStatistics,
    check_token_ids,
    model_device,
    valid_token_mask,
)
from ds_orthoadam.analysis.perplexity import NLLAccumulator, perplexity
from ds_orthoadam.analysis.quantize import PAPER_COMPARABLE_SCHEME, QuantScheme, quantizable_layers, quantized

DEFAULT_MAP_HEADS = 4


@dataclass
class SampleMaps:
    """Attention of a few heads and |hidden state| of one layer, for the first sample (real tokens only)."""

    layer: int
    heads: list[int]
    attention: np.ndarray | None = None  # [heads, T, T]
    activations: np.ndarray | None = None  # [T, D]


@dataclass
class ModelAnalysis:
    """JSON-ready numbers of one model (``record``) and the sample maps for the plots."""

    record: dict
    maps: SampleMaps = field(repr=False)


class _MetricPass:
    """Callbacks of one metric pass: feed the streaming statistics and capture the first sample's maps."""

    def __init__(self, stats: OutlierStatistics, maps: SampleMaps) -> None:
        self.stats, self.maps = stats, maps
        self.sample_length: int | None = None

    def on_hidden(self, layer: int, hidden: torch.Tensor) -> None:
        self.stats.update_hidden(layer, hidden)
        if self.maps.activations is None and layer == self.maps.layer:
            self.maps.activations = hidden[0, : self.sample_length].detach().abs().float().cpu().numpy()

    def on_attention(self, layer: int, probs: torch.Tensor) -> None:
        self.stats.update_attention(layer, probs)
        if self.maps.attention is None and layer == self.maps.layer:
            length = self.sample_length
            self.maps.attention = probs[0, self.maps.heads, :length, :length].detach().float().cpu().numpy()


def metric_pass(
    model: PreTrainedModel,
    batches: Collection[Batch],
    map_layer: int | None = None,
    map_heads: int = DEFAULT_MAP_HEADS,
    description: str | None = None,
    bos_token_id: int | None = None,
    sink_epsilon: float = DEFAULT_SINK_EPSILON,
) -> tuple[OutlierStatistics, float, SampleMaps, dict]:
    """Outlier statistics, full-precision perplexity, sample maps and data facts, all from one forward per batch.

    ``bos_token_id`` (default: the model config's) is only used to report how often the first token is BOS;
    ``sink_epsilon`` is the sink rate's threshold.
    """
    layers = num_layers(model)
    if map_layer is not None and not 0 <= map_layer < layers:
        raise AnalysisInputError(f"map layer {map_layer} does not exist; the model has layers 0..{layers - 1}")
    heads = model.config.get_text_config().num_attention_heads
    maps = SampleMaps(layers // 2 if map_layer is None else map_layer, list(range(min(map_heads, heads))))
    device = model_device(model)
    stats, nll = OutlierStatistics(layers, device, sink_epsilon), NLLAccumulator()
    callbacks = _MetricPass(stats, maps)
    bos_id = model.config.get_text_config().bos_token_id if bos_token_id is None else bos_token_id
    sequences = bos_first = seq_len = 0
    with evaluation_mode(model), eager_attention(model):
        with stream_layer_outputs(model, callbacks.on_hidden, callbacks.on_attention):
            for batch in tqdm(batches, desc=description, disable=description is None, leave=False):
                input_ids, attention_mask = batch_tensors(batch, device)
                valid = valid_token_mask(input_ids, attention_mask)
                check_token_ids(model, input_ids)
                callbacks.sample_length = int(valid[0].sum())
                stats.begin_batch(valid)
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                nll.update(logits, input_ids, valid)
                sequences, seq_len = sequences + input_ids.shape[0], input_ids.shape[1]
                bos_first += int((input_ids[:, 0] == bos_id).sum()) if bos_id is not None else 0
    data = {
        "sequences": sequences,
        "seq_len": seq_len,
        "predicted_tokens": nll.tokens,
        "first_token_is_bos_fraction": bos_first / sequences if sequences else float("nan"),
    }
    return stats, nll.perplexity, maps, data


def quantization_pass(
    model: PreTrainedModel, batches: Collection[Batch], schemes: Sequence[QuantScheme], reference_ppl: float,
    description: str | None = None,
) -> list[dict]:
    """Perplexity and penalty (quantised minus ``reference_ppl``) for every scheme; weights restored after each.

    Runs on the same eager attention path as the metric pass, so every perplexity of a report (and hence every
    penalty) comes from one numerical path, also in half precision.
    """
    results = []
    for scheme in tqdm(schemes, desc=description, disable=description is None, leave=False):
        with quantized(model, scheme), eager_attention(model):
            ppl = perplexity(model, batches, description and f"{description} {scheme.name}")
        results.append(
            {
                "scheme": scheme.name,
                "family": scheme.family,
                "bits": scheme.weight.bits,
                "weights": scheme.weight.label,
                "activations": scheme.activation_granularity,
                "perplexity": ppl,
                "penalty": ppl - reference_ppl,
                "paper_comparable": scheme.name == PAPER_COMPARABLE_SCHEME,
            }
        )
    return results


def analyze_model(
    model: PreTrainedModel,
    batches: Collection[Batch],
    schemes: Sequence[QuantScheme] = (),
    map_layer: int | None = None,
    description: str | None = None,
    bos_token_id: int | None = None,
    sink_epsilon: float = DEFAULT_SINK_EPSILON,
) -> ModelAnalysis:
    """Every number of the report for one model: outlier metrics (overall and per layer), perplexity, quantisation."""
    if not batches:
        raise AnalysisInputError("no validation batches to analyse; use more documents (--samples)")
    stats, ppl, maps, data = metric_pass(
        model, batches, map_layer, description=description, bos_token_id=bos_token_id, sink_epsilon=sink_epsilon
    )
    record = {
        "model": {
            "class": type(model).__name__,
            "attention_implementation": model.config._attn_implementation,
            "layers": stats.layers,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "quantized_layers": len(quantizable_layers(model)),
        },
        "data": data,
        "metrics": {key: value for key, value in stats.summary().items() if "/" not in key},
        "per_layer": stats.per_layer(),
        "perplexity": ppl,
        "quantization": quantization_pass(model, batches, schemes, ppl, description),
    }
    return ModelAnalysis(record, maps)
