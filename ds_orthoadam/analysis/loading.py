"""Load any local Hugging Face causal LM directory (and its tokenizer) for analysis, with clear errors."""
from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

import ds_orthoadam  # noqa: F401  (registers softmax-1 attention and our model classes before loading)
from ds_orthoadam.analysis.errors import AnalysisInputError
from ds_orthoadam.data import TokenizerError, check_vocab_fits, load_tokenizer

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_directory(path: str) -> None:
    """Fail fast (before any long analysis starts) on a missing path or a directory without config.json."""
    if not os.path.exists(path):
        raise AnalysisInputError(f"model directory {path} does not exist; pass a saved Hugging Face model directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise AnalysisInputError(
            f"{path} is not a Hugging Face model directory (no config.json); pass a directory written by "
            "save_pretrained or by our exporter"
        )


def load_causal_lm(path: str, device: str = "cpu", dtype: str = "auto") -> PreTrainedModel:
    """The model in directory ``path`` (weights in their saved dtype unless ``dtype`` says otherwise), in eval mode."""
    check_model_directory(path)
    if dtype not in DTYPES:
        raise AnalysisInputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise AnalysisInputError(f"{path}/config.json is not a readable transformers config: {error}") from error
    try:
        # Mismatched sizes are loaded (re-initialised) and refused below, with the names, rather than raised as a
        # RuntimeError whose message only points to a log table.
        model, info = AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True,
                                                           dtype=DTYPES[dtype], output_loading_info=True,
                                                           ignore_mismatched_sizes=True)
    except ValueError as error:
        raise AnalysisInputError(
            f"{path} holds a {config.model_type!r} model, which is not a causal language model "
            f"(AutoModelForCausalLM cannot load it: {str(error).splitlines()[0]}); pass a causal LM directory"
        ) from error
    except (OSError, RuntimeError) as error:
        raise AnalysisInputError(f"cannot load model weights from {path}: {error}") from error
    check_weights_match(path, info)
    return model.to(device).eval()


def check_weights_match(path: str, info: dict) -> None:
    """Refuse a model whose weights do not fill it exactly: transformers would initialise the rest at random and
    the analysis would measure noise (tied weights, such as an LM head shared with the embedding, are not listed)."""
    kinds = (("missing tensors", info.get("missing_keys")), ("unexpected tensors", info.get("unexpected_keys")),
             ("tensors of another shape", info.get("mismatched_keys")))
    problems = [f"{kind}: {len(keys)} (e.g. {_describe(keys)})" for kind, keys in kinds if keys]
    if problems:
        raise AnalysisInputError(
            f"the weights in {path} do not match its config.json: {'; '.join(problems)}; the model would "
            "be analysed with randomly initialised weights. Pass an unmodified directory written by save_pretrained "
            "or by our exporter (or restore its config.json)"
        )


def _describe(keys) -> str:
    """The first key in sorted order (with its two shapes for a mismatch), to name in a one-line message."""
    first = sorted(keys, key=str)[0]
    if isinstance(first, tuple):
        name, *shapes = first
        return f"{name}: {' vs '.join(str(tuple(shape)) for shape in shapes)}"
    return str(first)


def load_matching_tokenizer(model: PreTrainedModel, path: str) -> PreTrainedTokenizerBase:
    """The tokenizer at ``path``, refused if it produces ids the model's embedding cannot look up."""
    try:
        tokenizer = load_tokenizer(path)
    except TokenizerError as error:
        raise AnalysisInputError(f"{error}; pass the model's tokenizer directory with --tokenizer") from error
    try:
        check_vocab_fits(tokenizer, model.get_input_embeddings().num_embeddings)
    except TokenizerError as error:
        raise AnalysisInputError(
            f"tokenizer {path} does not belong to this model: {error}; to analyse, pass the model's own tokenizer "
            "with --tokenizer"
        ) from error
    return tokenizer
