"""Synthetic training data on which small transformers grow attention sinks and outlier activations within CPU minutes.

The task is a multi-offset variant of Bigram-Backcopy (Guo et al. 2024, "Active-Dormant Attention Heads"): documents
are a Markov chain over ``vocab`` content tokens (each row of the transition matrix drawn from a Dirichlet with
``concentration``), except after a *trigger* token: the ``triggers`` trigger tokens fall into ``offsets`` groups,
and a trigger of group g is followed by a copy of the token g + 1 places before it (group 0: the token just before
the trigger, the original Bigram-Backcopy), unless the trigger was itself a copy. Predicting a copy needs an attention head that looks back by the right
offset, predicting anything else needs none, so the heads that copy are active on the few positions after a trigger
and must do nothing everywhere else. Softmax gives them no way to attend to nothing; they learn to park their
attention on the first token (an attention sink), and Adam grows the residual-stream peak that makes the first
token's key stand out (an outlier activation). Why several offsets: with one offset a single head does all the
copying and few heads sink; each offset recruits more heads (see docs/testbed.md for the measurements).

The generator writes what ``python -m ds_orthoadam.data.pretokenize`` writes (``train/`` and ``validation/`` token
shards with an index) plus a word-level Hugging Face tokenizer (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, content token
``wI`` = id I + 3), so the trainer, the analyser and the export read it like any other pre-tokenised source: sharding,
shuffling, resume and validation are the data pipeline's own. ``task.json`` records the task and the loss of the
Bayes-optimal predictor on the validation documents, the floor a trained model's validation loss approaches.

CLI: ``python -m ds_orthoadam.data.synthetic --out data/testbed`` (see ``--help``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, fields
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast

from ds_orthoadam.cli import ensure_output_dir, integer_at_least, run_main
from .errors import DataError
from .pretokenize import remove_index, write_index, write_token_shard

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
FIRST_CONTENT_ID = len(SPECIAL_TOKENS)
TASK_FILE = "task.json"
TASK_FORMAT = 1
DOCUMENTS_PER_CHUNK = 4096  # documents generated per vectorised call (bounds memory, not the result)


class SyntheticTaskError(DataError):
    """Task parameters that describe no valid task; the message names the parameter and its range."""


@dataclass(frozen=True)
class BigramBackcopy:
    """The task's fixed tables are a function of these fields alone (``task_seed`` draws them)."""

    vocab: int = 64
    triggers: int = 24
    offsets: int = 8
    concentration: float = 0.1
    task_seed: int = 0

    def __post_init__(self) -> None:
        if self.vocab < 2:
            raise SyntheticTaskError(f"vocab must be at least 2 content tokens, not {self.vocab}")
        if not 0 <= self.triggers < self.vocab:
            raise SyntheticTaskError(f"triggers must be in [0, vocab - 1] = [0, {self.vocab - 1}] (a chain needs "
                                     f"non-trigger tokens), not {self.triggers}")
        if self.offsets < 1 or (self.triggers and self.offsets > self.triggers):
            raise SyntheticTaskError(f"offsets must be in [1, triggers] (each offset group needs a trigger), not "
                                     f"{self.offsets}")
        if not self.concentration > 0:
            raise SyntheticTaskError(f"concentration must be > 0, not {self.concentration}")

    @property
    def vocab_size(self) -> int:
        """Tokenizer / model vocabulary: the special tokens and the content tokens."""
        return FIRST_CONTENT_ID + self.vocab

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(transition [vocab, vocab], offset group per token: -1 for a non-trigger)."""
        rng = np.random.default_rng(self.task_seed)
        transition = rng.dirichlet(np.full(self.vocab, self.concentration), size=self.vocab)
        group = np.full(self.vocab, -1, dtype=np.int64)
        group[rng.choice(self.vocab, self.triggers, replace=False)] = np.arange(self.triggers) % self.offsets
        return transition, group

    def sample(self, rng: np.random.Generator, count: int, length: int) -> np.ndarray:
        """``count`` documents of ``length`` content indices (0..vocab-1), one row each.

        A trigger whose copy source would lie before the document's start is followed by a bigram draw instead."""
        transition, group = self.tables()
        cumulative = transition.cumsum(axis=1)
        cumulative[:, -1] = 1.0  # guard the last bucket against rounding
        docs = np.empty((count, length), dtype=np.int64)
        rows = np.arange(count)
        docs[:, 0] = rng.integers(0, self.vocab, count)
        copied = np.zeros(count, dtype=bool)
        for position in range(1, length):
            previous = docs[:, position - 1]
            draws = (rng.random(count)[:, None] > cumulative[previous]).sum(axis=1)
            copied = self._copies(group[previous], position, copied)
            source = np.maximum(position - 2 - group[previous], 0)
            docs[:, position] = np.where(copied, docs[rows, source], draws)
        return docs

    @staticmethod
    def _copies(previous_group: np.ndarray, position: int, previous_copied: np.ndarray) -> np.ndarray:
        """Whether the token at ``position`` is a copy: the previous token is a trigger with a copy source inside the
        document and was not itself copied (a copied trigger would copy again and again, locking documents into
        loops: with the default task 40% of all tokens instead of about a quarter)."""
        return (previous_group >= 0) & (position - 2 - previous_group >= 0) & ~previous_copied

    def optimal_loss(self, docs: np.ndarray) -> float:
        """Mean cross-entropy (nats) of the Bayes-optimal predictor over the training targets of ``docs``.

        The trainer sees ``BOS doc EOS`` and predicts every token after BOS: the first content token (uniform: log
        vocab), each next token given the past (0 after a trigger with a copy source, else the entropy of the
        previous token's transition row) and EOS, which comes at a fixed length (0)."""
        transition, group = self.tables()
        row_entropy = -(transition * np.log(np.where(transition > 0, transition, 1.0))).sum(axis=1)
        copied = np.zeros(docs.shape[0], dtype=bool)
        per_position = np.empty((docs.shape[0], docs.shape[1] - 1))
        for position in range(1, docs.shape[1]):
            previous = docs[:, position - 1]
            copied = self._copies(group[previous], position, copied)
            per_position[:, position - 1] = np.where(copied, 0.0, row_entropy[previous])
        targets = docs.shape[0] * (docs.shape[1] + 1)
        return float((docs.shape[0] * math.log(self.vocab) + per_position.sum()) / targets)


def content_token(index: int) -> str:
    return f"w{index}"


def build_tokenizer(task: BigramBackcopy) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose ids are the task's: specials 0-2, content token ``wI`` = I + 3."""
    vocabulary = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocabulary |= {content_token(index): FIRST_CONTENT_ID + index for index in range(task.vocab)}
    backend = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@dataclass(frozen=True)
class SplitPlan:
    """How many documents of which length a split gets, in how many shards, from which sample seed."""

    shards: int
    documents_per_shard: int
    length: int
    seed: int


def shard_documents(task: BigramBackcopy, plan: SplitPlan, shard: int) -> Iterator[np.ndarray]:
    """Shard ``shard``'s documents as token ids, generated in chunks from the seed ``(plan.seed, shard)``: each shard
    is independent of the others, so a split is the same whatever number of its shards is read."""
    rng = np.random.default_rng([plan.seed, shard])
    for start in range(0, plan.documents_per_shard, DOCUMENTS_PER_CHUNK):
        count = min(DOCUMENTS_PER_CHUNK, plan.documents_per_shard - start)
        yield from task.sample(rng, count, plan.length) + FIRST_CONTENT_ID


def write_split(task: BigramBackcopy, plan: SplitPlan, out_dir: str, tokenizer_dir: str, name: str) -> dict:
    """Generate and write one split as pre-tokenised shards; returns its index."""
    ensure_output_dir(out_dir)
    remove_index(out_dir)
    shards = [write_token_shard(out_dir, f"shard-{shard:05d}", shard_documents(task, plan, shard), "uint16")
              | {"source": f"{name} shard {shard}"} for shard in range(plan.shards)]
    return write_index(out_dir, shards, dtype="uint16", tokenizer_path=tokenizer_dir, vocab_size=task.vocab_size,
                       bos_id=SPECIAL_TOKENS.index("<s>"), eos_id=SPECIAL_TOKENS.index("</s>"), source=name)


def generate(out: str, task: BigramBackcopy, train: SplitPlan, validation: SplitPlan) -> dict:
    """Write ``out/{tokenizer,train,validation}`` and ``out/task.json``; returns what task.json holds.

    Idempotent: a directory whose task.json records the same task and plans is left as it is (generation is
    deterministic, so its shards are what a new run would write). task.json is written last: it marks a complete
    directory."""
    ensure_output_dir(out)
    record = {"format": TASK_FORMAT, "task": "bigram-backcopy", "parameters": asdict(task),
              "train": asdict(train), "validation": asdict(validation)}
    task_path = os.path.join(out, TASK_FILE)
    existing = read_task(out)
    if existing is not None and {key: existing.get(key) for key in record} == record:
        return existing
    if os.path.exists(task_path):
        os.remove(task_path)
    tokenizer_dir = os.path.join(out, "tokenizer")
    build_tokenizer(task).save_pretrained(tokenizer_dir)
    for split, plan in (("train", train), ("validation", validation)):
        write_split(task, plan, os.path.join(out, split), tokenizer_dir, f"bigram-backcopy {split}")
    validation_docs = np.stack([doc for shard in range(validation.shards)
                                for doc in shard_documents(task, validation, shard)])
    record["optimal_validation_loss"] = task.optimal_loss(validation_docs - FIRST_CONTENT_ID)
    with open(task_path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
    os.replace(task_path + ".tmp", task_path)
    return record


def read_task(directory: str) -> dict | None:
    """The task.json of a generated directory, or None (any other data source, or an incomplete directory)."""
    try:
        with open(os.path.join(directory, TASK_FILE), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None




def build_parser() -> argparse.ArgumentParser:
    defaults = BigramBackcopy()
    parser = argparse.ArgumentParser(prog="python -m ds_orthoadam.data.synthetic",
                                     description="Write the multi-offset Bigram-Backcopy task as pre-tokenised "
                                                 "train/validation shards plus its tokenizer (the testbed's data).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (gets tokenizer/, train/, validation/)")
    task = parser.add_argument_group("task")
    for field in fields(BigramBackcopy):
        parser_type = float if field.type in ("float", float) else int
        task.add_argument(f"--{field.name.replace('_', '-')}", type=parser_type, default=getattr(defaults, field.name))
    sizes = parser.add_argument_group("sizes")
    sizes.add_argument("--doc-length", type=integer_at_least(2), default=62,
                       help="content tokens per document (seq_len - 2 makes every packed sequence BOS doc EOS)")
    sizes.add_argument("--train-shards", type=integer_at_least(1), default=8)
    sizes.add_argument("--train-docs-per-shard", type=integer_at_least(1), default=16384)
    sizes.add_argument("--val-docs", type=integer_at_least(1), default=1024)
    sizes.add_argument("--seed", type=integer_at_least(0), default=0,
                       help="sample seed of the training documents (validation uses seed + 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: _generate(args))


def _generate(args: argparse.Namespace) -> str:
    task = BigramBackcopy(**{field.name: getattr(args, field.name) for field in fields(BigramBackcopy)})
    train = SplitPlan(args.train_shards, args.train_docs_per_shard, args.doc_length, args.seed)
    validation = SplitPlan(1, args.val_docs, args.doc_length, args.seed + 1)
    record = generate(args.out, task, train, validation)
    tokens = train.shards * train.documents_per_shard * (train.length + 1)
    return (f"bigram-backcopy task in {args.out}: {train.shards} train shards ({tokens:,} tokens with EOS), "
            f"{validation.documents_per_shard} validation documents; Bayes-optimal validation loss "
            f"{record['optimal_validation_loss']:.4f} nats/token")


if __name__ == "__main__":
    sys.exit(main())
