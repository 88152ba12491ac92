"""benchmarks/time_to_loss.py: its character ids are nanoGPT's (prepare.py), and bad flags are refused."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from paths import SHARED

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "time_to_loss.py"
TEXT = Path(SHARED) / "tinyshakespeare.txt"


def _bench():
    spec = importlib.util.spec_from_file_location("time_to_loss", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not TEXT.exists(), reason="shared/data/tinyshakespeare.txt not found")
def test_char_ids_are_nanogpts(monkeypatch):
    mod = _bench()
    monkeypatch.setattr(mod, "DATA", TEXT)
    train, val, vocab = mod._char_data()
    text = TEXT.read_text(encoding="utf-8")  # nanoGPT's data/shakespeare_char/prepare.py, as written there
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.int64)
    n = int(0.9 * len(ids))
    assert vocab == len(chars) == 65
    assert np.array_equal(train, ids[:n]) and np.array_equal(val, ids[n:])


@pytest.mark.parametrize("flags,msg", [
    (["--nanogpt", "--beta1", "0.8"], "--nanogpt runs nanoGPT's 2,000 steps"),
    (["--sides", "gptlab,tf"], "--sides: unknown side 'tf'"),
    (["--sides", "nanogpt"], "the nanogpt side needs --nanogpt-dir"),
    (["--beta1", "1"], "--beta1 1.0 must be in [0, 1)"),
    (["--target", "nan"], "--target nan must be a finite loss > 0"),
])
def test_bad_flags_are_refused_before_any_run(flags, msg):
    r = subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and msg in r.stderr and "reached" not in r.stdout
