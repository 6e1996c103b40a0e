"""Streaming outlier statistics: first-token attention dominance, hidden-state kurtosis and max |activation|.

Definitions (Kaul et al., ICLR 2025; how to run the analysis and read its report: docs/analysis.md):

* Hidden states X[m, l, d] are the outputs of block m (the residual stream), token l, channel d.
* Kurtosis per token: kappa = E_d[(X - mu)^4] / (E_d[(X - mu)^2])^2 over the channels (Pearson; Gaussian = 3).
  Averaged over tokens per layer, separately for the first token and for all other tokens, then over layers.
  Tokens whose hidden state is constant (variance 0, kurtosis undefined) are skipped.
* max |X| per token: max_d |X|, averaged over tokens per layer (first / rest), then over layers. ``peak_abs_*`` is
  the largest |X| seen anywhere instead of the average.
* First-token share: fraction of (query, head) pairs whose attention weight on the first key is strictly larger than
  on every other key (ties do not count, so uniform attention scores 0). The first query can only attend to itself,
  which would make it a sink by construction, so it is excluded. ``first_token_attention_mass`` is the mean weight on
  the first key over the same pairs (with softmax-1 a row may sum to less than 1, so this is an absolute mass).
  softmax-1 is softmax scaled per row by sigmoid(L) (L: the row's log-sum-exp), so its argmax, and hence the share,
  is the same as softmax's: the share cannot show a head that attends "nowhere"; the mass and the sink rate can.
* Chance level of the share (``first_token_share_chance``): the expected share if every visible key were equally
  likely to hold a row's largest weight (attention with no preference for any position, e.g. random logits, where
  ties have probability 0): query i (0-based, seeing keys 0..i) scores 1/(i+1), averaged over the measured queries.
  For full rows of length T that is ``(H_T - 1) / (T - 1)`` (:func:`argmax_share_chance`, H_T the harmonic number;
  its values at common lengths are in docs/analysis.md). It is also the first-token mass of exactly uniform
  attention; exactly uniform attention itself scores a share of 0, because a tie is not a largest weight.
* Sink rate (Gu et al., ICLR 2025, "When Attention Sink Emerges in Language Models"): per sequence and (layer, head),
  the mean attention weight on the first key over the sequence's real queries 1..len-1; a head is a sink when that
  mean exceeds ``sink_epsilon`` (default 0.3, Gu et al.'s). ``sink_rate`` is the share of (sequence, head) pairs
  that are sinks, per layer, averaged over layers (= the share of (sequence, layer, head) triples, as Gu et al.
  average over samples). Gu et al. include the first query; it is excluded here as in the share and mass. A
  sequence with a single real token has no such query and is not counted.

All accumulators are per-layer sums of fixed size, so memory does not grow with the number of samples. Batches must be
right-padded (or unpadded): position 0 is the first token of every row.
"""
from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel

from ds_orthoadam.analysis.errors import AnalysisInputError
from ds_orthoadam.analysis.hooks import eager_attention, evaluation_mode, num_layers, stream_layer_outputs

_SUM_FIELDS = (
    "sink_hits",
    "query_pairs",
    "first_mass",
    "sink_heads",
    "head_samples",
    "kurtosis_first",
    "kurtosis_first_count",
    "kurtosis_rest",
    "kurtosis_rest_count",
    "max_abs_first",
    "first_count",
    "max_abs_rest",
    "rest_count",
)
_PEAK_FIELDS = ("peak_abs_first", "peak_abs_rest")
PER_LAYER_KEYS = (
    "first_token_share",
    "first_token_attention_mass",
    "sink_rate",
    "kurtosis_first",
    "kurtosis_rest",
    "max_abs_first",
    "max_abs_rest",
    "peak_abs_first",
    "peak_abs_rest",
)


DEFAULT_SINK_EPSILON = 0.3  # Gu et al.'s threshold on a head's mean first-token attention


def argmax_share_chance(seq_len: int) -> float:
    """Chance level of the first-token share for full causal rows of ``seq_len`` tokens: the mean of 1/(i+1) over the
    queries i = 1..seq_len-1, i.e. ``(H_T - 1) / (T - 1)`` (see the module docstring). NaN below 2 tokens."""
    if seq_len < 2:
        return math.nan
    return math.fsum(1.0 / keys for keys in range(2, seq_len + 1)) / (seq_len - 1)


def valid_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Boolean [B, T] mask of real tokens; rejects left padding, which would move the first token off position 0."""
    if input_ids.dim() != 2:
        raise AnalysisInputError(f"input_ids must be a [batch, seq_len] tensor, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise AnalysisInputError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
        )
    mask = attention_mask.bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise AnalysisInputError(
            "attention_mask has padding before real tokens (left padding); the first token must be at position 0: "
            "pad on the right (tokenizer.padding_side = 'right')"
        )
    return mask


def token_kurtosis(hidden: torch.Tensor) -> torch.Tensor:
    """Pearson kurtosis over the last dimension, in float32; NaN where the vector is constant."""
    x = hidden.float()
    centred = x - x.mean(dim=-1, keepdim=True)
    second = centred.square().mean(dim=-1)
    fourth = centred.square().square().mean(dim=-1)
    return torch.where(second > 0, fourth / second.square(), torch.full_like(second, math.nan))


class OutlierStatistics:
    """Per-layer running sums of the outlier metrics; feed it with ``begin_batch`` then the layer callbacks."""

    def __init__(self, layers: int, device: torch.device | str = "cpu",
                 sink_epsilon: float = DEFAULT_SINK_EPSILON) -> None:
        self.layers = layers
        self.sink_epsilon = sink_epsilon
        # Chance level of the share: sum over measured queries of 1/(keys visible) and their number (every layer and
        # head measures the same queries, so one pair of sums serves all).
        self._chance = torch.zeros(2, dtype=torch.float64, device=device)
        self._sums = {name: torch.zeros(layers, dtype=torch.float64, device=device) for name in _SUM_FIELDS}
        self._peaks = {name: torch.zeros(layers, dtype=torch.float64, device=device) for name in _PEAK_FIELDS}
        self._first: torch.Tensor | None = None
        self._rest: torch.Tensor | None = None

    def begin_batch(self, valid: torch.Tensor) -> None:
        """Set the [B, T] real-token mask of the batch about to be forwarded."""
        self._first = valid[:, 0]
        self._rest = valid[:, 1:]
        keys_visible = torch.arange(2, valid.shape[1] + 1, device=valid.device, dtype=torch.float64)
        self._chance += torch.stack([(self._rest / keys_visible).sum(), self._rest.sum().double()])

    def update_hidden(self, layer: int, hidden: torch.Tensor) -> None:
        """Accumulate kurtosis and max |X| of block ``layer``'s output [B, T, D]."""
        kurtosis = token_kurtosis(hidden)
        max_abs = hidden.detach().abs().amax(dim=-1).float()
        parts = (("first", kurtosis[:, 0], max_abs[:, 0], self._first),
                 ("rest", kurtosis[:, 1:], max_abs[:, 1:], self._rest))
        sums, peaks = self._sums, self._peaks
        for part, kappa, token_max, mask in parts:
            defined = mask & ~kappa.isnan()
            sums[f"kurtosis_{part}"][layer] += torch.where(defined, kappa, 0.0).sum().double()
            sums[f"kurtosis_{part}_count"][layer] += defined.sum()
            masked_max = torch.where(mask, token_max, 0.0)
            sums[f"max_abs_{part}"][layer] += masked_max.sum().double()
            sums[f"{part}_count"][layer] += mask.sum()
            # |X| >= 0, so masked entries set to 0 cannot raise the peak (and no host sync is needed to check).
            peak = peaks[f"peak_abs_{part}"]
            peak[layer] = torch.maximum(peak[layer], masked_max.amax().double())

    def update_attention(self, layer: int, probs: torch.Tensor) -> None:
        """Accumulate first-token share, mass and sink heads of attention ``layer``'s weights [B, H, T, S] (queries
        1..T-1)."""
        queries = probs.detach()[:, :, 1:, :].float()
        first = queries[..., 0]
        others = queries[..., 1:].amax(dim=-1)
        mask = self._rest[:, None, :].expand_as(first)
        first_mass = torch.where(mask, first, 0.0).double()
        self._sums["sink_hits"][layer] += (mask & (first > others)).sum()
        self._sums["query_pairs"][layer] += mask.sum()
        self._sums["first_mass"][layer] += first_mass.sum()
        real_queries = self._rest.sum(dim=-1)  # [B]; a row without any has no head mean (0/0) and is not counted
        head_mean = first_mass.sum(dim=-1) / real_queries[:, None]  # [B, H]
        counted = (real_queries > 0)[:, None].expand_as(head_mean)
        self._sums["sink_heads"][layer] += (counted & (head_mean > self.sink_epsilon)).sum()
        self._sums["head_samples"][layer] += counted.sum()

    def per_layer(self) -> dict[str, list[float]]:
        """Every metric as a list over layers (NaN where nothing was measured)."""
        s = {name: value.cpu() for name, value in self._sums.items()}

        def ratio(numerator: str, denominator: str) -> list[float]:
            return (s[numerator] / s[denominator]).tolist()  # 0/0 gives NaN: nothing measured

        return {
            "first_token_share": ratio("sink_hits", "query_pairs"),
            "first_token_attention_mass": ratio("first_mass", "query_pairs"),
            "sink_rate": ratio("sink_heads", "head_samples"),
            "kurtosis_first": ratio("kurtosis_first", "kurtosis_first_count"),
            "kurtosis_rest": ratio("kurtosis_rest", "kurtosis_rest_count"),
            "max_abs_first": ratio("max_abs_first", "first_count"),
            "max_abs_rest": ratio("max_abs_rest", "rest_count"),
            "peak_abs_first": self._peaks["peak_abs_first"].cpu().tolist(),
            "peak_abs_rest": self._peaks["peak_abs_rest"].cpu().tolist(),
        }

    def summary(self) -> dict[str, float]:
        """Flat dict: averages over layers (peaks: maximum over layers), excess kurtosis, the share's chance level,
        and ``layer_{i}/<key>``."""
        per_layer = self.per_layer()
        result: dict[str, float] = {}
        for key, values in per_layer.items():
            tensor = torch.tensor(values, dtype=torch.float64)
            result[key] = float(tensor.max() if key.startswith("peak") else tensor.mean())
        result["excess_kurtosis_first"] = result["kurtosis_first"] - 3.0
        result["excess_kurtosis_rest"] = result["kurtosis_rest"] - 3.0
        chance, queries = self._chance.tolist()
        result["first_token_share_chance"] = chance / queries if queries else math.nan
        for key, values in per_layer.items():
            for layer, value in enumerate(values):
                result[f"layer_{layer}/{key}"] = value
        return result


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_token_ids(model: PreTrainedModel, input_ids: torch.Tensor) -> None:
    """Reject token ids the model's embedding cannot look up (a tokenizer/model vocabulary mismatch)."""
    vocab = model.get_input_embeddings().num_embeddings
    if input_ids.numel() and (int(input_ids.max()) >= vocab or int(input_ids.min()) < 0):
        raise AnalysisInputError(
            f"token ids range over [{int(input_ids.min())}, {int(input_ids.max())}] but the model's embedding has "
            f"{vocab} rows: the tokenizer does not belong to this model; pass the model's own tokenizer"
        )


def outlier_metrics(
    model: PreTrainedModel, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
    sink_epsilon: float = DEFAULT_SINK_EPSILON,
) -> dict[str, float]:
    """All outlier metrics of ``model`` on one batch (e.g. a fixed probe batch for training telemetry).

    Keys: ``first_token_share``, ``first_token_attention_mass``, ``sink_rate`` (threshold ``sink_epsilon``),
    ``kurtosis_first``, ``kurtosis_rest``, ``excess_kurtosis_first``, ``excess_kurtosis_rest``, ``max_abs_first``,
    ``max_abs_rest``, ``peak_abs_first``, ``peak_abs_rest`` (layer averages; peaks are maxima),
    ``first_token_share_chance`` and ``layer_{i}/<key>`` for each of ``PER_LAYER_KEYS``.
    Runs under ``torch.no_grad()`` in eval mode on a weight-returning attention of the model's own kind; the
    attention implementation and the training mode are restored afterwards. Skips the LM head (logits unused).
    A DeepSpeed engine may be passed as is: its wrapped ``module`` is measured.
    """
    if not isinstance(model, PreTrainedModel) and isinstance(getattr(model, "module", None), PreTrainedModel):
        model = model.module
    device = model_device(model)
    input_ids = input_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    valid = valid_token_mask(input_ids, attention_mask)
    check_token_ids(model, input_ids)
    stats = OutlierStatistics(num_layers(model), device, sink_epsilon)
    with evaluation_mode(model), eager_attention(model):
        with stream_layer_outputs(model, stats.update_hidden, stats.update_attention):
            stats.begin_batch(valid)
            model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return stats.summary()
