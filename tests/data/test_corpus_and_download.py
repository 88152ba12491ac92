"""Corpus specs (builtin, named, file, dir, jsonl) and checksummed downloads, all offline."""

import hashlib
import io
import json
import shutil
import urllib.error
import zipfile

import pytest

from gptlab.data import DATASETS, cache_dir, fetch_dataset, iter_corpus, load_corpus
from gptlab.data import download
from gptlab.errors import GptlabError


def test_builtin_corpus():
    from pydoc_data.topics import topics

    text = load_corpus()
    assert text == load_corpus("builtin")
    assert len(text) > 400_000  # about 465K characters on CPython 3.11
    assert text.startswith(topics[sorted(topics)[0]]) and text.endswith(topics[sorted(topics)[-1]])
    assert "".join(iter_corpus(None, chunk_chars=10_000)) == text


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path / "data"
    monkeypatch.delenv("GPTLAB_CACHE")
    assert str(cache_dir()).endswith(".cache/gptlab/data")


def test_preseeded_cache_is_used_without_download(cache, shared_data):
    cache.mkdir(parents=True)
    shutil.copy(shared_data / "the-verdict.txt", cache / "the-verdict.txt")
    text = load_corpus("the-verdict")
    assert len(text) == 20_479 and text.startswith("I HAD always thought Jack Gisburn")


def test_download_is_checked_and_cached(cache, shared_data, monkeypatch):
    calls = []
    body = (shared_data / "tinyshakespeare.txt").read_bytes()

    def fake(url, timeout=60.0):
        calls.append(url)
        return body

    monkeypatch.setattr(download, "download_url", fake)
    path = fetch_dataset("tinyshakespeare")
    assert path == cache / "tinyshakespeare.txt" and path.read_bytes() == body
    assert calls == [DATASETS["tinyshakespeare"].url]
    fetch_dataset("tinyshakespeare")
    assert len(calls) == 1  # second call served from the cache
    assert load_corpus("tinyshakespeare").startswith("First Citizen:\nBefore we proceed")


def test_bad_checksum_is_not_kept(cache, monkeypatch):
    monkeypatch.setattr(download, "download_url", lambda url, timeout=60.0: b"<html>rate limited</html>")
    with pytest.raises(GptlabError, match=r"SHA-256 .* expected b41e41a6.*not kept"):
        fetch_dataset("the-verdict")
    assert not (cache / "the-verdict.txt").exists()


def test_corrupt_cached_file_is_replaced(cache, shared_data, monkeypatch):
    cache.mkdir(parents=True)
    (cache / "the-verdict.txt").write_text("truncated")
    good = (shared_data / "the-verdict.txt").read_bytes()
    monkeypatch.setattr(download, "download_url", lambda url, timeout=60.0: good)
    assert fetch_dataset("the-verdict").read_bytes() == good


def test_wrong_hand_placed_file_offline_is_reported_not_deleted(cache, monkeypatch):
    cache.mkdir(parents=True)
    (cache / "the-verdict.txt").write_text("some other story")

    def offline(url, timeout=60.0):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(download, "download_url", offline)
    with pytest.raises(GptlabError, match=r"the-verdict.txt is there but has SHA-256 .*expected b41e41a6"):
        fetch_dataset("the-verdict")
    assert (cache / "the-verdict.txt").read_text() == "some other story"


def test_offline_error_names_url_and_path(cache, monkeypatch):
    def offline(url, timeout=60.0):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(download, "download_url", offline)
    with pytest.raises(GptlabError) as e:
        fetch_dataset("instruction-data")
    msg = str(e.value)
    assert DATASETS["instruction-data"].url in msg and str(cache / "instruction-data.json") in msg


def test_zip_dataset_is_extracted_and_checked(cache, shared_data, monkeypatch):
    tsv = (shared_data / "SMSSpamCollection.tsv").read_bytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme", "SMS Spam Collection v.1")
        z.writestr("SMSSpamCollection", tsv)
    monkeypatch.setattr(download, "download_url", lambda url, timeout=60.0: buf.getvalue())
    path = fetch_dataset("sms-spam")
    assert path.name == "SMSSpamCollection.tsv"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == DATASETS["sms-spam"].sha256
    with pytest.raises(GptlabError, match="not a text corpus.*fetch_dataset"):
        load_corpus("sms-spam")


def test_unknown_dataset(cache):
    with pytest.raises(GptlabError, match="unknown dataset 'wikitext'; known: the-verdict"):
        fetch_dataset("wikitext")


def test_file_dir_and_jsonl(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second\r\nfile")
    (tmp_path / "docs" / "a.txt").write_text("first file ")
    (tmp_path / "docs" / "skip.md").write_text("not a txt file")
    assert load_corpus(tmp_path / "docs") == "first file \n\nsecond\r\nfile"  # sorted, CRLF kept
    assert load_corpus(tmp_path / "docs" / "a.txt") == "first file "
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["one", "two 🙂"])) + "\n\n")
    assert load_corpus(jl) == "one\n\ntwo 🙂"


def test_bad_corpora(tmp_path):
    with pytest.raises(GptlabError, match="not found; accepted: 'builtin'"):
        load_corpus(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(GptlabError, match="is empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(GptlabError, match="not UTF-8 text.*offset 3"):
        load_corpus(tmp_path / "latin1.txt")
    (tmp_path / "d").mkdir()
    with pytest.raises(GptlabError, match="holds no .txt files"):
        load_corpus(tmp_path / "d")
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(GptlabError, match="line 2 has no string 'text' field"):
        load_corpus(tmp_path / "x.jsonl")
    (tmp_path / "y.jsonl").write_text("not json\n")
    with pytest.raises(GptlabError, match="line 1 is not valid JSON"):
        load_corpus(tmp_path / "y.jsonl")


def test_utf8_split_across_reads(tmp_path):
    text = "é🙂" * 1000
    (tmp_path / "u.txt").write_text(text, encoding="utf-8")
    pieces = list(iter_corpus(tmp_path / "u.txt", chunk_chars=7))  # 7-byte reads cut characters in half
    assert "".join(pieces) == text
