"""Offline data for the tests: generated English-like documents and C4-format shards of them (the session fixtures
built from these, ``corpus``, ``tokenizer_dir`` and ``tokenizer``, are in conftest.py)."""
from __future__ import annotations

import gzip
import json
import os
import random

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no what up out said about into "
         "time can only new some could these two may first then do any like my now over such our man me even most "
         "made after also did many before must through back years where much your way well down should because "
         "each just those people how too little state good very make world still own see men work long get here "
         "between both life being under never day same another know while last might us great old year off come "
         "since against go came right used take three").split()


def make_documents(count: int, seed: int = 0, min_words: int = 3, max_words: int = 120) -> list[str]:
    """Unique documents (each names its number) of random words, numbers and some punctuation and non-ASCII."""
    rng = random.Random(seed)
    documents = []
    for number in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        words.insert(rng.randrange(len(words)), f"{rng.randint(0, 99999)},")
        text = f"Document {number}: " + " ".join(words) + rng.choice([".", "!", " — café.", "?"])
        documents.append(text)
    return documents


def write_json_shard(path: str, texts: list[str]) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        for index, text in enumerate(texts):
            handle.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z",
                                     "url": f"https://example.org/{index}"}) + "\n")
    return path


def write_c4_directory(directory: str, train: list[list[str]], validation: list[str]) -> str:
    os.makedirs(directory, exist_ok=True)
    for index, texts in enumerate(train):
        write_json_shard(os.path.join(directory, f"c4-train.{index:05d}-of-{len(train):05d}.json.gz"), texts)
    write_json_shard(os.path.join(directory, "c4-validation.00000-of-00001.json.gz"), validation)
    return directory
