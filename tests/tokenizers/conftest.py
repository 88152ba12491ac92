"""Shared fixtures: the GPT-2 files, tiktoken's offline cache, a small corpus."""

from paths import SHARED  # noqa: E402
import hashlib
import shutil
from pathlib import Path

import pytest

DATA = Path(SHARED)
GPT2_DIR = DATA / "gpt2"
VERDICT = DATA / "the-verdict.txt"


@pytest.fixture(scope="session")
def gpt2_dir():
    if not (GPT2_DIR / "encoder.json").is_file():
        pytest.skip("GPT-2 tokenizer files not available")
    return GPT2_DIR


@pytest.fixture(scope="session")
def verdict_text():
    if not VERDICT.is_file():
        pytest.skip("the-verdict.txt not available")
    return VERDICT.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiktoken_cache(gpt2_dir, tmp_path_factory):
    """A TIKTOKEN_CACHE_DIR pre-seeded with the GPT-2 files, named as tiktoken names them."""
    from gptlab.tokenizers.gpt2 import ENCODER_URL, VOCAB_URL

    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for url, name in ((ENCODER_URL, "encoder.json"), (VOCAB_URL, "vocab.bpe")):
        shutil.copy(gpt2_dir / name, cache / hashlib.sha1(url.encode()).hexdigest())
    return cache


@pytest.fixture()
def offline_tiktoken(tiktoken_cache, monkeypatch):
    """tiktoken reads only from the seeded cache; any download attempt fails the test."""
    import tiktoken.load

    def no_network(url):
        raise AssertionError(f"tiktoken tried to download {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    return tiktoken_cache
