"""Tiny models and data shared by the fine-tuning tests (CPU, seconds)."""

from paths import SHARED  # noqa: E402
from pathlib import Path

import pytest
import torch

from ft_helpers import tiny_gpt2

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
if not DATA.is_dir():
    DATA = Path(SHARED)
SMS = DATA / "SMSSpamCollection.tsv"
INSTRUCTIONS = DATA / "instruction-data.json"


@pytest.fixture(scope="session")
def sms_path():
    if not SMS.is_file():
        pytest.skip(f"{SMS} not present")
    return SMS


@pytest.fixture(scope="session")
def instructions_path():
    if not INSTRUCTIONS.is_file():
        pytest.skip(f"{INSTRUCTIONS} not present")
    return INSTRUCTIONS


@pytest.fixture(scope="session")
def char_tok(sms_path):
    from gptlab.tokenizers import CharTokenizer

    import json

    text = sms_path.read_text(encoding="utf-8")
    if INSTRUCTIONS.is_file():
        text += "".join(v for e in json.loads(INSTRUCTIONS.read_text(encoding="utf-8")) for v in e.values())
    return CharTokenizer.from_text(text + "#")


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, char_tok):
    """A saved tiny GPT-2 with a character tokenizer (a stand-in for a pretrained model)."""
    from gptlab.weights.native import save_model_dir

    d = tmp_path_factory.mktemp("base")
    save_model_dir(tiny_gpt2(char_tok.vocab_size), d, char_tok)
    return d


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: tiny models gain nothing from two, and on a shared CPU two can be ~8x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
