"""Build the demo corpus: public-domain English prose as C4-format json.gz shards under ``data/demo/``.

The texts come from source distributions on PyPI, fetched at set-up time with
``pip download --no-deps --no-binary :all:`` (nothing is committed): the Canterbury corpus in brotli 1.2.1
(Alice in Wonderland, As You Like It, a Library of Congress workshop report, Paradise Lost) and Botchan in
sentencepiece 0.2.3 (about 1.5 MB together). ``--with-jargon`` adds the Jargon File (public domain, ~1.7 MB) from
the Debian package jargon-text via ``apt-get download``. Texts are cut into documents of a few paragraphs,
shuffled with a fixed seed, and 5% go to validation.

Output: ``c4-train.0000{0,1}-of-00002.json.gz``, ``c4-validation.00000-of-00001.json.gz`` (fields text, timestamp,
url, like C4) and ``MANIFEST.json``. Idempotent: a second run with the same inputs rewrites nothing, and the
gzip bytes are reproducible (no timestamps in the headers).

CLI: ``python -m ds_orthoadam.data.demo_corpus [--out data/demo] [--with-jargon]`` (``make demo-data``).
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from dataclasses import dataclass

from ds_orthoadam.cli import ensure_output_dir, run_main
from .errors import DataSourceError

BUILDER_VERSION = 1
DOCUMENT_CHARS = 2000  # about the median length of a C4 document
VALIDATION_FRACTION = 0.05
TRAIN_SHARDS = 2
SEED = 0
TIMESTAMP = "2019-04-25T00:00:00Z"


@dataclass(frozen=True)
class PackagedText:
    """A text file inside a registry package: (package, version, path inside the archive below its top folder)."""

    package: str
    version: str
    member: str

    @property
    def name(self) -> str:
        return os.path.basename(self.member)


PYPI_TEXTS = (
    PackagedText("brotli", "1.2.1", "tests/testdata/alice29.txt"),
    PackagedText("brotli", "1.2.1", "tests/testdata/asyoulik.txt"),
    PackagedText("brotli", "1.2.1", "tests/testdata/lcet10.txt"),
    PackagedText("brotli", "1.2.1", "tests/testdata/plrabn12.txt"),
    PackagedText("sentencepiece", "0.2.3", "test/botchan.txt"),
)
JARGON = PackagedText("jargon-text", "4.4.7-4.1", "usr/share/doc/jargon-text/jargon.txt.gz")


def download_sdists(texts: tuple[PackagedText, ...], cache_dir: str) -> dict[tuple[str, str], str]:
    """Fetch each package's source distribution once (kept in ``cache_dir``); returns its archive per package."""
    ensure_output_dir(cache_dir, "--cache")
    archives = {}
    for package, version in sorted({(text.package, text.version) for text in texts}):
        pattern = os.path.join(cache_dir, f"{package}-{version}.tar.gz")
        if not glob.glob(pattern):
            base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d",
                    cache_dir, f"{package}=={version}"]
            # Without build isolation pip prepares metadata in seconds instead of installing build tools first.
            if subprocess.run(base + ["--no-build-isolation"], capture_output=True).returncode != 0:
                result = subprocess.run(base, capture_output=True, text=True)
                if result.returncode != 0:
                    raise DataSourceError(f"pip download {package}=={version} failed ({result.stderr.strip()[-300:]}); "
                                          f"the demo corpus needs access to PyPI once, at set-up")
        archives[(package, version)] = glob.glob(pattern)[0]
    return archives


def download_jargon(cache_dir: str) -> str:
    """The jargon-text .deb via apt-get download (Debian/Ubuntu only)."""
    ensure_output_dir(cache_dir, "--cache")
    found = glob.glob(os.path.join(cache_dir, "jargon-text_*.deb"))
    if not found:
        result = subprocess.run(["apt-get", "download", f"jargon-text={JARGON.version}"], cwd=cache_dir,
                                capture_output=True, text=True)
        found = glob.glob(os.path.join(cache_dir, "jargon-text_*.deb"))
        if result.returncode != 0 or not found:
            raise DataSourceError(f"apt-get download jargon-text failed ({result.stderr.strip()[-300:]}); "
                                  f"build the demo corpus without --with-jargon")
    return found[0]


def extract_sdist_texts(texts: tuple[PackagedText, ...], archives: dict[tuple[str, str], str]) -> dict[str, str]:
    """Read the named members out of the source archives (utf-8; a leading BOM and CRLF line ends removed)."""
    extracted = {}
    for text in texts:
        with tarfile.open(archives[(text.package, text.version)]) as archive:
            member = f"{text.package}-{text.version}/{text.member}"
            try:
                data = archive.extractfile(member).read()
            except KeyError as error:
                raise DataSourceError(f"{member} is missing from {archives[(text.package, text.version)]}") from error
        extracted[text.name] = data.decode("utf-8-sig").replace("\r\n", "\n")
    return extracted


def extract_jargon(deb_path: str) -> str:
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb_path], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        compressed = archive.extractfile("./" + JARGON.member).read()
    return gzip.decompress(compressed).decode("utf-8", errors="replace").replace("\r\n", "\n")


def split_into_documents(text: str, target_chars: int = DOCUMENT_CHARS) -> list[str]:
    """Cut a book into C4-like documents: a few paragraphs each, hard-wrapped lines joined, one paragraph a line.

    Paragraphs are separated by blank lines; a paragraph longer than ``target_chars`` (some texts have no blank
    lines) is cut at line ends.
    """
    pieces: list[str] = []
    for paragraph in text.split("\n\n"):
        lines = [line.strip() for line in paragraph.split("\n") if line.strip()]
        pieces.extend(_join_in_runs(lines, target_chars, " "))
    return _join_in_runs(pieces, target_chars, "\n")


def _join_in_runs(items: list[str], target_chars: int, separator: str) -> list[str]:
    """Join consecutive items with ``separator`` into runs of at least ``target_chars`` (the last run may be short)."""
    runs, current = [], []
    for item in items:
        current.append(item)
        if sum(map(len, current)) >= target_chars:
            runs.append(separator.join(current))
            current = []
    if current:
        runs.append(separator.join(current))
    return runs


def _write_json_gz(path: str, records: list[dict]) -> None:
    payload = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as handle:
        handle.write(payload)


def _sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def write_demo_corpus(texts: dict[str, str], out_dir: str) -> bool:
    """Write the shards for ``texts`` (name -> text) unless identical ones exist; returns True if it wrote."""
    inputs = hashlib.sha256(json.dumps([BUILDER_VERSION, sorted(texts.items())]).encode()).hexdigest()
    manifest_path = os.path.join(out_dir, "MANIFEST.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as handle:
            manifest = json.load(handle)
        if manifest.get("inputs") == inputs and all(
                os.path.exists(os.path.join(out_dir, name)) and _sha256(os.path.join(out_dir, name)) == digest
                for name, digest in manifest["files"].items()):
            return False
    records = [{"text": document, "timestamp": TIMESTAMP, "url": f"demo://{name}#{number}"}
               for name in sorted(texts) for number, document in enumerate(split_into_documents(texts[name]))]
    if len(records) < 2:
        raise DataSourceError(f"the demo texts make only {len(records)} document(s); need at least 2")
    random.Random(SEED).shuffle(records)
    num_validation = max(1, round(len(records) * VALIDATION_FRACTION))
    train, validation = records[num_validation:], records[:num_validation]
    shards = {f"c4-train.{i:05d}-of-{TRAIN_SHARDS:05d}.json.gz": train[i::TRAIN_SHARDS] for i in range(TRAIN_SHARDS)}
    shards["c4-validation.00000-of-00001.json.gz"] = validation
    ensure_output_dir(out_dir)
    for name, shard in shards.items():
        _write_json_gz(os.path.join(out_dir, name), shard)
    manifest = {"builder_version": BUILDER_VERSION, "inputs": inputs, "sources": sorted(texts),
                "documents": {"train": len(train), "validation": len(validation)},
                "files": {name: _sha256(os.path.join(out_dir, name)) for name in shards}}
    with open(manifest_path, "w") as handle:
        json.dump(manifest, handle, indent=1)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_orthoadam.data.demo_corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/demo", help="output directory (default data/demo)")
    parser.add_argument("--cache", default=None, help="where downloaded archives are kept (default OUT/downloads)")
    parser.add_argument("--with-jargon", action="store_true", help="add the Jargon File (Debian jargon-text)")
    args = parser.parse_args(argv)
    return run_main(lambda: _build(args))


def _build(args: argparse.Namespace) -> str:
    cache = args.cache or os.path.join(args.out, "downloads")
    ensure_output_dir(args.out)  # before any download
    texts = extract_sdist_texts(PYPI_TEXTS, download_sdists(PYPI_TEXTS, cache))
    if args.with_jargon:
        texts["jargon.txt"] = extract_jargon(download_jargon(cache))
    wrote = write_demo_corpus(texts, args.out)
    with open(os.path.join(args.out, "MANIFEST.json")) as handle:
        counts = json.load(handle)["documents"]
    state = "written" if wrote else "up to date"
    return f"demo corpus {state}: {args.out} ({counts['train']} train / {counts['validation']} validation documents)"


if __name__ == "__main__":
    sys.exit(main())
