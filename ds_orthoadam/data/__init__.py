"""Data pipeline: sources (C4 hub / local shards / text), SentencePiece tokenizer, packing, sharded resumable
training stream, pre-tokenised shards, fixed validation set, and the built-in demo corpus.

Typical use (one rank)::

    tokenizer = load_tokenizer("data/demo/tokenizer")
    stream = TrainStream("data/demo", tokenizer, seq_len=256, micro_batch_size=8, rank=r, world_size=w)
    validation = validation_batches(validation_source("data/demo"), tokenizer, seq_len=256, batch_size=8)

Names are imported lazily (PEP 562), so ``python -m ds_orthoadam.data.<module>`` runs each CLI module once.
"""
from importlib import import_module

_EXPORTS = {
    "DataArgumentError": "errors", "DataError": "errors", "DataSourceError": "errors", "TokenizerError": "errors",
    "IGNORE_INDEX": "packing", "sequence_policy": "packing",
    "DataSource": "sources", "resolve_source": "sources", "validation_source": "sources",
    "RankBatches": "rank_batches", "TrainStream": "stream",
    "check_vocab_fits": "tokenizer", "load_tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
    "PAPER_VALIDATION_DOCS": "validation", "ValidationSet": "validation", "validation_batches": "validation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
