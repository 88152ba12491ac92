"""Shared fixtures: the shared data files and an isolated, offline data cache."""

from paths import SHARED  # noqa: E402
from pathlib import Path

import pytest

DATA = Path(SHARED)


@pytest.fixture(scope="session")
def shared_data():
    if not (DATA / "the-verdict.txt").is_file():
        pytest.skip("shared data files not available")
    return DATA


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """GPTLAB_CACHE points at an empty temp dir and every download attempt fails the test."""
    from gptlab.data import download

    def no_network(url, timeout=60.0):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(download, "download_url", no_network)
    return tmp_path / "cache" / "data"


@pytest.fixture(scope="session")
def gpt2_tok():
    from gptlab.tokenizers import load_tokenizer

    if not (DATA / "gpt2" / "encoder.json").is_file():
        pytest.skip("GPT-2 tokenizer files not available")
    return load_tokenizer(DATA / "gpt2")
