"""Model zoo: named GPT2 and Llama configurations, built as real transformers models.

Llama sizes up to 1.4B follow the common C4 pre-training recipe the paper uses (hidden / intermediate / heads /
layers); beyond the paper, ``llama-7b`` is Llama-2-7B's shape and ``llama-3b`` StableLM-3B-4E1T's (why that one:
docs/models.md). Both are trained under ZeRO-3 (docs/zero3.md).
The paper does not give GPT2 sizes: ours keep the Llama sibling's width (head dim 64, MLP 4x) and pick the depth
whose parameter count is closest to the Llama sibling's (vocabulary 32000, tied GPT2 embeddings, untied Llama head).
``tiny`` models (~2-3M parameters with the 8192-token demo tokenizer) are for CPU demos and tests.

Options:
* ``attention``: ``softmax`` (transformers' SDPA attention) or ``softmax1`` (see ``ds_orthoadam.attention``).
* ``norm``: ``default`` (GPT2: LayerNorm, Llama: RMSNorm with per-channel gain) or ``single_scale_rmsnorm`` (RMSNorm
  with one scalar gain, reported to matter for reaching kurtosis ~3). No stock transformers class can express the
  latter, so it uses thin subclasses registered with the Auto classes under their own ``model_type``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ds_orthoadam.attention import SOFTMAX1_AUTO
from ds_orthoadam.errors import UserError

DEFAULT_SEQ_LEN = 256
DEFAULT_VOCAB_SIZE = 32000
TINY_VOCAB_SIZE = 8192
TESTBED_VOCAB_SIZE = 67  # the testbed task's 64 content tokens and 3 special tokens (ds_orthoadam.data.synthetic)

ATTENTION_CHOICES = ("softmax", "softmax1")
NORM_CHOICES = ("default", "single_scale_rmsnorm")
_ATTN_IMPLEMENTATION = {"softmax": "sdpa", "softmax1": SOFTMAX1_AUTO}


class ModelConfigError(UserError, ValueError):
    """An unknown model name or option, with the valid choices in the message."""


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one named model; ``params`` is the documented parameter count at ``vocab_size``."""

    family: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab_size: int
    params: int


MODEL_SPECS: dict[str, ModelSpec] = {
    "llama-tiny": ModelSpec("llama", 128, 4, 4, 344, TINY_VOCAB_SIZE, 2_888_832),
    "llama-60m": ModelSpec("llama", 512, 8, 8, 1376, DEFAULT_VOCAB_SIZE, 58_073_600),
    "llama-130m": ModelSpec("llama", 768, 12, 12, 2048, DEFAULT_VOCAB_SIZE, 134_105_856),
    "llama-350m": ModelSpec("llama", 1024, 24, 16, 2736, DEFAULT_VOCAB_SIZE, 367_969_280),
    "llama-1.4b": ModelSpec("llama", 2048, 24, 32, 5461, DEFAULT_VOCAB_SIZE, 1_339_082_752),
    "llama-3b": ModelSpec("llama", 2560, 32, 32, 6912, DEFAULT_VOCAB_SIZE, 2_701_562_880),
    "llama-7b": ModelSpec("llama", 4096, 32, 32, 11008, DEFAULT_VOCAB_SIZE, 6_738_415_616),
    "gpt2-tiny": ModelSpec("gpt2", 128, 6, 4, 512, TINY_VOCAB_SIZE, 2_271_232),
    "llama-testbed": ModelSpec("llama", 64, 3, 4, 172, TESTBED_VOCAB_SIZE, 157_248),
    "gpt2-60m": ModelSpec("gpt2", 512, 13, 8, 2048, DEFAULT_VOCAB_SIZE, 57_497_088),
    "gpt2-130m": ModelSpec("gpt2", 768, 15, 12, 3072, DEFAULT_VOCAB_SIZE, 131_092_224),
    "gpt2-350m": ModelSpec("gpt2", 1024, 27, 16, 4096, DEFAULT_VOCAB_SIZE, 373_130_240),
    "gpt2-1.4b": ModelSpec("gpt2", 2048, 25, 32, 8192, DEFAULT_VOCAB_SIZE, 1_325_021_184),
    "gpt2-3b": ModelSpec("gpt2", 2560, 33, 40, 10240, DEFAULT_VOCAB_SIZE, 2_678_904_320),
    "gpt2-7b": ModelSpec("gpt2", 4096, 33, 64, 16384, DEFAULT_VOCAB_SIZE, 6_777_663_488),
}


class SingleScaleRMSNorm(nn.Module):
    """RMSNorm with a single scalar gain shared by all channels (no per-channel scale, no bias).

    A per-channel gain gives Adam-style optimisers a privileged basis in the residual stream; one scalar does not.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, single scalar gain"


def _replace_norms(model: nn.Module, eps: float) -> None:
    """Swap every LayerNorm / per-channel RMSNorm of ``model`` for a SingleScaleRMSNorm of the same width."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, child_name, SingleScaleRMSNorm(child.normalized_shape[-1], eps))
            elif isinstance(child, LlamaRMSNorm):
                setattr(parent, child_name, SingleScaleRMSNorm(child.weight.shape[-1], eps))


class SingleScaleNormLlamaConfig(LlamaConfig):
    model_type = "llama_single_scale_norm"


class SingleScaleNormLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose RMSNorms have one scalar gain."""

    config_class = SingleScaleNormLlamaConfig

    def __init__(self, config: SingleScaleNormLlamaConfig) -> None:
        super().__init__(config)
        _replace_norms(self, config.rms_norm_eps)


class SingleScaleNormGPT2Config(GPT2Config):
    model_type = "gpt2_single_scale_norm"


class SingleScaleNormGPT2LMHeadModel(GPT2LMHeadModel):
    """GPT2LMHeadModel whose LayerNorms are replaced by single-scale RMSNorms."""

    config_class = SingleScaleNormGPT2Config

    def __init__(self, config: SingleScaleNormGPT2Config) -> None:
        super().__init__(config)
        _replace_norms(self, config.layer_norm_epsilon)


def register_model_classes() -> None:
    """Make the single-scale-norm variants loadable with AutoConfig / AutoModelForCausalLM (idempotent)."""
    for config_cls, model_cls in (
        (SingleScaleNormLlamaConfig, SingleScaleNormLlamaForCausalLM),
        (SingleScaleNormGPT2Config, SingleScaleNormGPT2LMHeadModel),
    ):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


_CLASSES = {
    ("llama", "default"): (LlamaConfig, LlamaForCausalLM),
    ("llama", "single_scale_rmsnorm"): (SingleScaleNormLlamaConfig, SingleScaleNormLlamaForCausalLM),
    ("gpt2", "default"): (GPT2Config, GPT2LMHeadModel),
    ("gpt2", "single_scale_rmsnorm"): (SingleScaleNormGPT2Config, SingleScaleNormGPT2LMHeadModel),
}


def _check_choice(kind: str, value: str, choices) -> None:
    if value not in choices:
        raise ModelConfigError(f"unknown {kind} {value!r}; valid choices: {', '.join(choices)}")


def model_spec(name: str) -> ModelSpec:
    """The ModelSpec of a named model, or a ModelConfigError listing the valid names."""
    _check_choice("model", name, tuple(MODEL_SPECS))
    return MODEL_SPECS[name]


def _architecture_kwargs(spec: ModelSpec, vocab_size: int, max_seq_len: int) -> dict:
    if spec.family == "llama":
        return dict(
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads,
            num_hidden_layers=spec.layers,
            vocab_size=vocab_size,
            max_position_embeddings=max_seq_len,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        )
    return dict(
        n_embd=spec.hidden,
        n_inner=spec.intermediate,
        n_head=spec.heads,
        n_layer=spec.layers,
        vocab_size=vocab_size,
        n_positions=max_seq_len,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        # GPT2's defaults (50256) lie outside our SentencePiece vocabularies, whose BOS/EOS are 1/2 like Llama's.
        bos_token_id=1,
        eos_token_id=2,
    )


def build_config(
    name: str,
    attention: str = "softmax1",
    norm: str = "default",
    vocab_size: int | None = None,
    max_seq_len: int = DEFAULT_SEQ_LEN,
    **overrides,
) -> PreTrainedConfig:
    """The transformers config of a named model. ``overrides`` must be existing config fields (e.g. bos_token_id)."""
    spec = model_spec(name)
    _check_choice("attention", attention, ATTENTION_CHOICES)
    _check_choice("norm", norm, NORM_CHOICES)
    config_cls, _ = _CLASSES[(spec.family, norm)]
    config = config_cls(**_architecture_kwargs(spec, vocab_size or spec.vocab_size, max_seq_len))
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ModelConfigError(f"{config_cls.__name__} has no field {key!r}; check the spelling of the override")
        setattr(config, key, value)
    set_attention(config, attention)
    return config


def set_attention(config: PreTrainedConfig, attention: str) -> None:
    """Select softmax or softmax-1 on ``config`` in a way that save_pretrained writes to config.json.

    transformers does not serialise the attention implementation; a top-level ``attn_implementation`` key in
    config.json is read back by from_pretrained, so a saved softmax-1 model reloads with softmax-1 (after
    ``import ds_orthoadam`` has registered it; without that import loading fails loudly instead of silently
    running ordinary softmax).
    """
    _check_choice("attention", attention, ATTENTION_CHOICES)
    implementation = _ATTN_IMPLEMENTATION[attention]
    config._attn_implementation = implementation
    config.attn_implementation = implementation


def build_model(
    name: str,
    attention: str = "softmax1",
    norm: str = "default",
    vocab_size: int | None = None,
    max_seq_len: int = DEFAULT_SEQ_LEN,
    **overrides,
) -> PreTrainedModel:
    """A freshly initialised GPT2LMHeadModel / LlamaForCausalLM (or its single-scale-norm subclass) for ``name``."""
    config = build_config(name, attention, norm, vocab_size, max_seq_len, **overrides)
    _, model_cls = _CLASSES[(model_spec(name).family, norm)]
    return model_cls(config)


def build_partitioned_model(ds_config: dict, name: str, **build_kwargs) -> PreTrainedModel:
    """:func:`build_model` constructed under ``deepspeed.zero.Init`` for a ZeRO-3 ``ds_config``: every parameter is
    partitioned across the ranks as it is created, so no rank ever holds the whole model (a 7B model does not fit one
    32 GB V100 in fp32). Collective: every rank must call it.

    Built through transformers' own DeepSpeed integration (``HfDeepSpeedConfig`` + ``from_config``), which enters
    ``zero.Init`` and then runs the model's ``_init_weights`` on each module's gathered parameters (rank 0
    initialises, DeepSpeed broadcasts); a bare ``zero.Init`` around the constructor would leave the default
    ``nn.Linear`` initialisation, since the parameters are already empty partitions when ``post_init`` runs. The
    integration's global setting is dropped again afterwards: left on, transformers would enter ``zero.Init`` (a
    collective) in any later ``from_config``, e.g. the export on rank 0 alone.
    """
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    config = build_config(name, **build_kwargs)
    integration = HfDeepSpeedConfig(ds_config)  # noqa: F841  (transformers holds only a weak reference to it)
    try:
        return AutoModelForCausalLM.from_config(config)
    finally:
        unset_hf_deepspeed_config()


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied embeddings are counted once)."""
    return sum(p.numel() for p in model.parameters())


def build_meta_model(name: str, **build_kwargs) -> PreTrainedModel:
    """:func:`build_model` on the meta device: shapes and config without memory, e.g. to count the parameters of a
    model that is partitioned (ZeRO-3) or too large for this machine."""
    with torch.device("meta"):
        return build_model(name, **build_kwargs)


def meta_parameter_count(name: str, **build_kwargs) -> int:
    """Parameter count of a named model built on the meta device (no memory is allocated)."""
    return count_parameters(build_meta_model(name, **build_kwargs))
