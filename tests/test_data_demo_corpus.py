"""Demo corpus builder on fixture archives (no network): extraction, C4 format, split, idempotence."""
import io
import os
import re
import tarfile

import pytest

from data_fixtures import make_documents
from ds_orthoadam.data.demo_corpus import PYPI_TEXTS, extract_sdist_texts, split_into_documents, write_demo_corpus
from ds_orthoadam.data.errors import DataSourceError
from ds_orthoadam.data.sources import resolve_source


@pytest.fixture
def fixture_archives(tmp_path):
    """Small stand-ins for the brotli and sentencepiece sdists, with the members at their real paths."""
    members: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    for number, text in enumerate(PYPI_TEXTS):
        body = "\ufeff" + "\r\n\r\n".join(d.replace(" the ", " the\r\n") for d in make_documents(40, seed=number))
        members.setdefault((text.package, text.version), []).append(
            (f"{text.package}-{text.version}/{text.member}", body.encode()))
    archives = {}
    for (package, version), files in members.items():
        archives[(package, version)] = path = str(tmp_path / f"{package}-{version}.tar.gz")
        with tarfile.open(path, "w:gz") as archive:
            for name, data in files:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return archives


def words(text):
    return re.findall(r"\S+", text)


def test_build_from_archives_is_c4_format_split_and_idempotent(fixture_archives, tmp_path):
    texts = extract_sdist_texts(PYPI_TEXTS, fixture_archives)
    assert sorted(texts) == sorted(text.name for text in PYPI_TEXTS)
    assert all("\r" not in text and not text.startswith("\ufeff") for text in texts.values())
    out = str(tmp_path / "demo")
    assert write_demo_corpus(texts, out) is True
    train = list(resolve_source(out, "train").documents())
    validation = list(resolve_source(out, "validation").documents())
    assert resolve_source(out, "train").num_shards == 2 and validation and not set(train) & set(validation)
    assert sorted(words(" ".join(train + validation))) == sorted(words(" ".join(texts.values())))
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    assert write_demo_corpus(texts, out) is False
    assert before == {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    os.remove(os.path.join(out, "c4-validation.00000-of-00001.json.gz"))
    assert write_demo_corpus(texts, out) is True
    assert before == {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}


def test_documents_keep_every_word_in_order():
    text = "\n\n".join(make_documents(30)) + "\n" + "\n".join(make_documents(60, seed=3))  # a long paragraph too
    documents = split_into_documents(text, target_chars=500)
    assert words(" ".join(documents)) == words(text)
    assert max(map(len, documents)) < 2 * 500 + 300


def test_missing_member_is_reported(fixture_archives):
    broken = PYPI_TEXTS[:1] + (type(PYPI_TEXTS[0])("brotli", "1.2.1", "tests/testdata/nothere.txt"),)
    with pytest.raises(DataSourceError, match="nothere.txt is missing"):
        extract_sdist_texts(broken, fixture_archives)


def test_cli_refuses_a_file_as_out_before_any_download(tmp_path, capsys):
    from ds_orthoadam.data.demo_corpus import main

    (tmp_path / "afile").write_text("x")
    assert main(["--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out") and "is an existing file" in err[0]
