"""The calibration sanity check, fed made-up figures (nothing is timed), and what happens to a rejected set."""

import json
import math

import pytest

from gptlab.fit import calibration, hardware
from gptlab.fit.calibration_check import calibration_problems
from gptlab.fit.catalog import spec_from_ref
from gptlab.fit.estimate import decode_tokens_per_s
from gptlab.fit.calibration import detect_hardware, load_calibration
from gptlab.fit.hardware import DEFAULT_SPEEDS

from fit_machines import make_hw

# Figures like this 2-core VM's on a quiet moment.
SANE = {
    "cpu_bandwidth": 16e9, "cpu_bandwidth_1core": 10e9,
    "cpu_bandwidth_by_width": {"512": 9.5e9, "1024": 13.3e9, "2048": 17.3e9, "4096": 18.6e9},
    "cpu_matmul_fp32": 83e9, "cpu_matmul_fp32_1core": 45e9, "cpu_matmul_bf16": 198e9,
    "op_latency": 1.7e-6, "runtime_rss": 296 * 2**20,
    "decode_overhead": {"gpt2": {"per_layer": 1.0e-4, "fixed": 7e-5}, "llama": {"per_layer": 1.6e-4, "fixed": 9e-5}},
    "gpus": {},
}
# Short rows caught at a crowded moment, long ones at a quiet one.
BAD_CURVE = {"512": 1e9, "1024": 20e9, "2048": 20e9, "4096": 20e9}


def figures(**changes) -> dict:
    return {**SANE, **changes}


def test_sane_figures_and_the_defaults_pass():
    assert calibration_problems(SANE) == []
    assert calibration_problems(DEFAULT_SPEEDS) == []  # the fallback must pass its own check
    # An older cache without the one-thread matmul or the width curve: what is there is checked.
    old = {k: v for k, v in SANE.items() if k not in ("cpu_matmul_fp32_1core", "cpu_bandwidth_by_width")}
    assert calibration_problems(old) == []


def test_within_noise_all_threads_may_be_a_little_slower_than_one():
    assert calibration_problems(figures(cpu_bandwidth=8.5e9, cpu_bandwidth_1core=10e9)) == []
    assert calibration_problems(figures(cpu_matmul_fp32=40e9, cpu_matmul_fp32_1core=45e9)) == []


@pytest.mark.parametrize("changes, expected", [
    ({"cpu_bandwidth": 4e9, "cpu_bandwidth_1core": 10e9},
     "cpu_bandwidth 4 GB/s with all threads is below 10 GB/s with one"),
    ({"cpu_matmul_fp32": 20e9}, "cpu_matmul_fp32 20 GFLOP/s with all threads is below 45 GFLOP/s with one"),
    ({"cpu_bandwidth": 0.0}, "cpu_bandwidth 0 GB/s is outside the plausible 0.1 GB/s .. 1e+04 GB/s"),
    ({"cpu_bandwidth": -3e9}, "cpu_bandwidth -3 GB/s is outside the plausible"),
    ({"cpu_matmul_bf16": math.nan}, "cpu_matmul_bf16 is nan, not a number"),
    ({"cpu_matmul_bf16": None}, "cpu_matmul_bf16 is None, not a number"),
    ({"cpu_bandwidth": 5e13}, "cpu_bandwidth 5e+04 GB/s is outside the plausible"),
    ({"op_latency": 0.5}, "op_latency 0.5 s is outside the plausible"),
    ({"runtime_rss": 1024}, "runtime_rss 0 MiB is outside the plausible 16 MiB .. 16384 MiB"),
    ({"cpu_bandwidth_by_width": {**SANE["cpu_bandwidth_by_width"], "512": 0.0}},
     "cpu_bandwidth at width 512 0 GB/s is outside"),
    ({"decode_overhead": {"llama": {"per_layer": -1e-4, "fixed": 0.0}}}, "llama decode overhead per_layer -0.0001 s"),
    ({"gpus": {"RTX": {"bandwidth": 1e6, "matmul_bf16": 1e14}}}, "RTX bandwidth 0.001 GB/s is outside"),
    # The square matmul cannot be slower in FLOP/s than the GEMV streaming the same weights.
    ({"cpu_matmul_fp32": 4e9, "cpu_matmul_fp32_1core": 4e9}, "cpu_matmul_fp32 4 GFLOP/s is below the decode GEMV's 8"),
    # 8 ms per layer is 60x a layer's 75 ops at 1.7 us: threads waiting for a core, not the runtime.
    ({"decode_overhead": {"llama": {"per_layer": 8e-3, "fixed": 0.0}}},
     "llama decode overhead 8 ms per layer is 63x its 75 ops at 1.7 us/op"),
])
def test_each_kind_of_nonsense_is_named(changes, expected):
    problems = calibration_problems(figures(**changes))
    assert any(expected in p for p in problems), problems


def test_a_curve_that_ranks_a_small_model_slower_is_rejected():
    small, big = spec_from_ref("smollm2-135m"), spec_from_ref("smollm2-360m")

    def tps(curve, spec):
        return decode_tokens_per_s(spec, _hw(curve), "Q4_K_M", 1024)
    # The symptom: with this curve the estimator itself puts the 360M model ahead of the 135M one ...
    assert tps(BAD_CURVE, big) > tps(BAD_CURVE, small)
    assert tps(SANE["cpu_bandwidth_by_width"], big) < tps(SANE["cpu_bandwidth_by_width"], small)
    # ... and the check says so in one line, naming the first such pair it meets.
    problems = calibration_problems(figures(cpu_bandwidth_by_width=BAD_CURVE))
    assert len(problems) == 1 and "the bytes per token of" in problems[0], problems
    assert "but is estimated" in problems[0] and "512: 1, 1024: 20" in problems[0]


def test_more_bytes_but_fewer_flops_may_be_faster():
    # Llama 2 7B reads more than Llama 3 8B at 1K tokens (32 KV heads) but does fewer FLOPs (smaller head);
    # on a machine whose matmuls bound the step it is honestly faster: not a problem.
    slow_matmul = figures(cpu_matmul_fp32=9e9, cpu_matmul_fp32_1core=9e9, cpu_matmul_bf16=9e9)
    hw = _hw(SANE["cpu_bandwidth_by_width"], cpu_matmul_fp32=9e9, cpu_matmul_bf16=9e9)
    l2, l3 = spec_from_ref("llama-2-7b"), spec_from_ref("llama-3-8b")
    assert decode_tokens_per_s(l2, hw, "Q2_K", 1024) > decode_tokens_per_s(l3, hw, "Q2_K", 1024)
    assert calibration_problems(slow_matmul) == []


def _hw(curve, **speeds):
    hw = make_hw(bandwidth=16e9)
    hw.cpu_bandwidth_by_width = curve
    for k, v in speeds.items():
        setattr(hw, k, v)
    return hw


# ---------------------------------------------------------------- re-measure, then fall back
@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "_nvml_gpus", lambda notes: [])
    monkeypatch.setattr(hardware, "_amd_gpus", lambda: [])
    return tmp_path / "fit-calibration.json"


def fake_calibrate(monkeypatch, *results):
    """calibrate() returns these figure sets in turn (the last one repeats); returns the call log."""
    calls = []

    def calibrate(gpus=None):
        calls.append(1)
        return dict(results[min(len(calls), len(results)) - 1])
    monkeypatch.setattr(calibration, "calibrate", calibrate)
    return calls


NONSENSE = figures(cpu_bandwidth=3e9, cpu_bandwidth_1core=10e9)


def test_a_failed_measurement_is_repeated(cache, monkeypatch, capsys):
    calls = fake_calibrate(monkeypatch, NONSENSE, NONSENSE, SANE)
    entry, fresh = load_calibration([])
    assert entry == SANE and fresh and len(calls) == 3
    assert json.loads(cache.read_text())[calibration._fingerprint([])] == SANE
    assert capsys.readouterr().err == ""


def test_persistent_nonsense_falls_back_to_defaults_and_is_not_cached(cache, monkeypatch, capsys):
    calls = fake_calibrate(monkeypatch, NONSENSE)
    hw = detect_hardware()
    assert len(calls) == calibration.CALIBRATION_TRIES
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("warning: gptlab fit: calibration rejected after 3 tries (cpu_bandwidth 3 GB/s")
    assert "using default speeds" in err[0]
    assert not hw.calibrated and hw.cpu_bandwidth == DEFAULT_SPEEDS["cpu_bandwidth"]
    assert hw.cpu_matmul_fp32 == DEFAULT_SPEEDS["cpu_matmul_fp32"] and hw.decode_overhead == {}
    assert any("failed the sanity check 3 times" in a and "--calibrate" in a for a in hw.assumptions)
    stored = json.loads(cache.read_text())[calibration._fingerprint([])]
    assert "cpu_bandwidth" not in stored and stored["rejected"].startswith("cpu_bandwidth 3 GB/s")
    # The runtime RSS is a memory figure, not a timing: measured, it stays, and plans use it
    assert stored["runtime_rss"] == NONSENSE["runtime_rss"] != DEFAULT_SPEEDS["runtime_rss"]
    assert hw.runtime_rss == NONSENSE["runtime_rss"]
    assert any(f"{NONSENSE['runtime_rss'] / 2**20:.0f} MiB runtime (measured)" in a for a in hw.assumptions)
    # Later runs use the defaults without measuring again (and say why) ...
    again = detect_hardware()
    assert len(calls) == 3 and not again.calibrated and capsys.readouterr().err == ""
    assert any("failed the sanity check" in a for a in again.assumptions)
    assert not detect_hardware(measure=False).calibrated
    # ... until --calibrate, which measures afresh.
    calls2 = fake_calibrate(monkeypatch, SANE)
    fixed = detect_hardware(calibrate_now=True)
    assert len(calls2) == 1 and fixed.calibrated and fixed.cpu_bandwidth == SANE["cpu_bandwidth"]


def test_cached_nonsense_from_before_the_check_is_measured_again(cache, monkeypatch, capsys):
    cache.write_text(json.dumps({calibration._fingerprint([]): NONSENSE}))
    stale = detect_hardware(measure=False)  # no measuring allowed: defaults, with the reason
    assert not stale.calibrated and stale.cpu_bandwidth == DEFAULT_SPEEDS["cpu_bandwidth"]
    assert any("cached speeds fail the sanity check (cpu_bandwidth 3 GB/s" in a for a in stale.assumptions)
    calls = fake_calibrate(monkeypatch, SANE)
    hw = detect_hardware()
    assert len(calls) == 1 and hw.calibrated and hw.cpu_bandwidth == SANE["cpu_bandwidth"]
    assert "measuring again" in capsys.readouterr().err


def test_a_rejection_cached_without_the_runtime_rss_measures_it_once(cache, monkeypatch):
    key = calibration._fingerprint([])
    cache.write_text(json.dumps({key: {"rejected": "cpu_bandwidth 3 GB/s ...", "tries": 3, "measured_at": "x"}}))
    measured = []
    monkeypatch.setattr(calibration, "measure_runtime_rss", lambda: measured.append(1) or 250 * 2**20)
    hw = detect_hardware()
    assert hw.runtime_rss == 250 * 2**20 and not hw.calibrated and measured == [1]
    assert json.loads(cache.read_text())[key]["runtime_rss"] == 250 * 2**20
    assert detect_hardware().runtime_rss == 250 * 2**20 and measured == [1]  # cached: not measured again
