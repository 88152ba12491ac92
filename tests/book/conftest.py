"""Shared fixtures: the GPT-2 tokenizer offline, and the course's data files."""

from __future__ import annotations

from paths import SHARED  # noqa: E402

import hashlib
import shutil
from pathlib import Path

import pytest

DATA = Path(SHARED)
_URLS = {
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
}


@pytest.fixture(scope="session")
def tiktoken_cache(tmp_path_factory) -> Path:
    """A TIKTOKEN_CACHE_DIR pre-filled with GPT-2's files, so get_encoding("gpt2") works offline."""
    d = tmp_path_factory.mktemp("tiktoken-cache")
    for name, url in _URLS.items():
        shutil.copy(DATA / "gpt2" / name, d / hashlib.sha1(url.encode()).hexdigest())
    return d


@pytest.fixture
def tokenizer(tiktoken_cache, monkeypatch):
    """tiktoken's GPT-2 encoding, exactly what the course's ``tiktoken.get_encoding("gpt2")`` returns."""
    import tiktoken

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache))
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="session")
def verdict() -> str:
    path = DATA / "the-verdict.txt"
    if not path.exists():
        pytest.skip("the-verdict.txt not available")
    return path.read_text(encoding="utf-8")


@pytest.fixture
def data_dir() -> Path:
    """The shared test data folder (the-verdict, SMS spam, instruction data, GPT-2 BPE files)."""
    return DATA


@pytest.fixture
def tiny_cfg() -> dict:
    """A course-style config small enough to train in a second on CPU (GPT-2's vocabulary)."""
    return {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
            "drop_rate": 0.1, "qkv_bias": False}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These tests use tiny tensors, where one thread beats two on a shared machine; restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
