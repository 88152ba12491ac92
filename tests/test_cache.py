"""gptlab cache: listing the Hugging Face hub cache and gptlab's own cache, and deleting for real.

The hub cache is built the way huggingface_hub lays it out (models--org--name/blobs holding the
files, snapshots/<commit>/ holding relative symlinks to them, refs/main holding the commit), so the
real scanner and its delete strategy run on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from gptlab.cache import hub_cache_dir, list_cache, parse_age, remove_cache
from gptlab.cli import run
from gptlab.errors import GptlabError

pytest.importorskip("huggingface_hub")

DAY = 86400


def _repo(hub: Path, repo_id: str, revisions: dict[str, dict[str, bytes]], main: str, age_days: float = 0):
    """A hub cache entry: ``revisions`` is {commit: {file name: content}}; identical contents share a blob."""
    root = hub / f"models--{repo_id.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(main)
    stamp = time.time() - age_days * DAY
    for commit, files in revisions.items():
        snap = root / "snapshots" / commit
        snap.mkdir(parents=True)
        for name, data in files.items():
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            os.utime(blob, (stamp, stamp))
            (snap / name).symlink_to(os.path.relpath(blob, snap))
    return root


def _du(path: Path) -> int:
    """Bytes of the regular files under ``path`` (what a deletion must really take away), the 40-byte
    refs/ files left out (the scanner counts blobs)."""
    return sum(f.stat().st_size for f in path.rglob("*")
               if f.is_file() and not f.is_symlink() and f.parent.name != "refs")


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """HF_HOME and GPTLAB_CACHE in tmp, holding two hub repos (one old, one with two revisions) and two own files."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "own"))
    hub = tmp_path / "hf" / "hub"
    weights_old, weights_new, config = b"w" * 30_000, b"W" * 50_000, b'{"model_type": "llama"}'
    _repo(hub, "someone/old-model", {"a" * 40: {"config.json": b'{"old": 1}', "model.safetensors": b"o" * 20_000}},
          main="a" * 40, age_days=40)
    _repo(hub, "HuggingFaceTB/tiny", {"b" * 40: {"config.json": config, "model.safetensors": weights_old},
                                      "c" * 40: {"config.json": config, "model.safetensors": weights_new}},
          main="c" * 40)
    own = tmp_path / "own"
    (own / "data").mkdir(parents=True)
    (own / "data" / "tinyshakespeare.txt").write_bytes(b"s" * 7_000)
    (own / "fit-calibration.json").write_text(json.dumps({"x": 1}))
    return hub, own


def test_listing_reads_both_caches_with_sizes(caches):
    hub, own = caches
    assert hub_cache_dir() == hub
    listing = list_cache()
    by_name = {i.name: i for i in listing.items}
    assert set(by_name) == {"someone/old-model", "HuggingFaceTB/tiny", "data/tinyshakespeare.txt",
                            "fit-calibration.json"}
    tiny = by_name["HuggingFaceTB/tiny"]
    # the shared config blob counts once: config + both weight files
    assert tiny.size == len(b'{"model_type": "llama"}') + 30_000 + 50_000
    assert tiny.revisions == ["b" * 40, "c" * 40] and tiny.refs == ["main"]
    assert by_name["data/tinyshakespeare.txt"].size == 7_000 and by_name["data/tinyshakespeare.txt"].kind == "dataset"
    assert by_name["fit-calibration.json"].kind == "calibration"
    assert time.time() - by_name["someone/old-model"].last_used > 39 * DAY
    assert listing.free[str(hub)] > 0 and listing.total == _du(hub) + _du(own)


def test_rm_pattern_deletes_the_bytes(caches):
    hub, own = caches
    before = _du(hub)
    removal = remove_cache("huggingfacetb/*")  # case-insensitive glob
    assert [i.name for i in removal.items] == ["HuggingFaceTB/tiny"]
    assert not (hub / "models--HuggingFaceTB--tiny").exists()
    assert before - _du(hub) == removal.freed == 23 + 80_000
    assert (hub / "models--someone--old-model").is_dir() and (own / "data" / "tinyshakespeare.txt").is_file()


def test_rm_older_than_takes_only_old_items(caches):
    hub, own = caches
    stamp = time.time() - 60 * DAY
    os.utime(own / "data" / "tinyshakespeare.txt", (stamp, stamp))
    removal = remove_cache(older_than="30d")
    assert sorted(i.name for i in removal.items) == ["data/tinyshakespeare.txt", "someone/old-model"]
    assert removal.freed == 7_000 + 20_000 + len(b'{"old": 1}')
    assert not (hub / "models--someone--old-model").exists() and not (own / "data" / "tinyshakespeare.txt").exists()
    assert (hub / "models--HuggingFaceTB--tiny").is_dir() and (own / "fit-calibration.json").is_file()


def test_dry_run_deletes_nothing_and_all_deletes_everything(caches):
    hub, own = caches
    total = _du(hub) + _du(own)
    dry = remove_cache(all=True, dry_run=True)
    assert dry.freed == total and _du(hub) + _du(own) == total
    removal = remove_cache(all=True)
    assert removal.freed == total
    assert _du(hub) == 0 and _du(own) == 0 and list_cache().items == []


def test_hf_hub_cache_beats_hf_home(caches, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere"
    _repo(other, "x/y", {"d" * 40: {"config.json": b"{}"}}, main="d" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert [i.name for i in list_cache().items if i.cache == "hub"] == ["x/y"]


def test_bad_selections_are_refused(caches):
    with pytest.raises(GptlabError, match="say what to remove"):
        remove_cache()
    with pytest.raises(GptlabError, match="nothing cached matches 'nobody/.*'"):
        remove_cache("nobody/*")
    with pytest.raises(GptlabError, match="removes everything; give it alone"):
        remove_cache("x", all=True)
    with pytest.raises(GptlabError, match="not an age"):
        parse_age("30 days")
    assert parse_age("2w") == 14 * DAY and parse_age("12h") == 12 * 3600 and parse_age("3") == 3 * DAY


def test_cli_lists_and_removes(caches, capsys):
    hub, own = caches
    assert run(["cache"]) == 0
    out = capsys.readouterr().out
    assert "Hugging Face hub cache: " + str(hub) in out and "free on its disk" in out
    assert "HuggingFaceTB/tiny" in out and "data/tinyshakespeare.txt" in out and "40 days ago" in out
    assert run(["cache", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {i["name"] for i in data["items"]} >= {"someone/old-model", "fit-calibration.json"}
    assert run(["cache", "rm", "someone/old-model", "--dry-run"]) == 0
    assert "would free" in capsys.readouterr().out and (hub / "models--someone--old-model").is_dir()
    assert run(["cache", "rm", "someone/old-model"]) == 0
    out = capsys.readouterr().out
    assert "removed hub:someone/old-model" in out and "freed 19.5 KiB (20,010 bytes)" in out
    assert not (hub / "models--someone--old-model").exists()
    assert run(["cache", "rm"]) == 1
    assert "error: say what to remove" in capsys.readouterr().err
    assert run(["cache", "rm", "--older-than", "soon"]) == 1
    assert "--older-than 'soon' is not an age" in capsys.readouterr().err
    assert run(["cache", "rm", "x", "--all"]) == 1  # the flags as typed, not all=True / older_than
    assert capsys.readouterr().err == ("error: --all removes everything; give it alone, or drop it and give a "
                                       "PATTERN and/or --older-than\n")


def test_cache_prefix_picks_one_cache(caches):
    hub, own = caches
    removal = remove_cache("gptlab:*")
    assert sorted(i.name for i in removal.items) == ["data/tinyshakespeare.txt", "fit-calibration.json"]
    assert _du(own) == 0 and _du(hub) == 23 + 80_000 + 20_010
