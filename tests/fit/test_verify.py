"""--verify: estimated vs measured, in a clean subprocess."""

import json
import math

import pytest

from gptlab.cli import run
from gptlab.fit import benchmarks, calibration
from gptlab.fit.verify import TARGETS, render_verify, verify_model

from fit_machines import make_hw


@pytest.mark.slow
def test_verify_tiny_preset_memory():
    """A tiny model: the measured peak RSS of a clean process is within the memory target."""
    hw = make_hw()
    hw.runtime_rss = benchmarks.measure_runtime_rss()
    res = verify_model("gpt2-nano", hw, prompt=8, new_tokens=8, threads=1)
    assert res["measured"]["peak_reset"] is True
    assert abs(res["errors"]["memory"]) <= TARGETS["memory"]
    assert res["measured"]["decode_tokens_per_s"] > 0 and res["estimated"]["decode_tokens_per_s"] > 0
    text = render_verify(res)
    assert "peak RSS (decode)" in text and "error" in text


def test_verify_bad_ref(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    (tmp_path / "fit-calibration.json").write_text(json.dumps({calibration._fingerprint([]): {
        "cpu_bandwidth": 1e10, "cpu_matmul_fp32": 1e11, "cpu_matmul_bf16": 1e11, "runtime_rss": 2**28}}))
    assert run(["fit", "--verify", "no-such-model"]) == 1


@pytest.mark.slow
def test_verify_smollm2_within_targets(smollm2_path):
    """SmolLM2-135M (GGUF, dequantized to fp32): memory within ±15 %, training memory within ±20 %.

    The decode-speed estimate (target ±30 %) is not asserted here: a timing on a shared
    machine is not a test (observed -12 % ... +47 % for identical runs). ``gptlab fit
    --verify`` prints it; here it only has to be measured and finite.
    """
    hw = calibration.detect_hardware()
    res = verify_model(str(smollm2_path), hw, train=True, batch=2, context=64, threads=1)
    print(render_verify(res))
    assert abs(res["errors"]["memory"]) <= TARGETS["memory"]
    assert abs(res["errors"]["train_memory"]) <= TARGETS["train_memory"]
    assert math.isfinite(res["errors"]["decode"])
