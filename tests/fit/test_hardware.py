"""Hardware detection, simulation, MIG parsing, Ollama probe, the calibration cache."""

import json
import socket

import pytest

from gptlab.errors import GptlabError
from gptlab.fit import benchmarks, calibration, hardware
from gptlab.fit.calibration import detect_hardware
from gptlab.fit.hardware import ollama_running, parse_mig_uuids, simulate

from fit_machines import make_hw

GiB = 2**30
FIGURES = {"cpu_bandwidth": 20e9, "cpu_bandwidth_1core": 8e9, "cpu_matmul_fp32": 2e11, "cpu_matmul_bf16": 8e11,
           "op_latency": 4e-6, "runtime_rss": 280 * 2**20, "decode_overhead": {}, "gpus": {}}


@pytest.fixture
def cached(tmp_path, monkeypatch):
    """A calibration cache for this machine, so no microbenchmark runs."""
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    (tmp_path / "fit-calibration.json").write_text(json.dumps({calibration._fingerprint([]): FIGURES}))
    return tmp_path


def test_detect_uses_cache_and_real_sizes(cached, monkeypatch):
    monkeypatch.setattr(hardware, "_nvml_gpus", lambda notes: [])
    monkeypatch.setattr(hardware, "_amd_gpus", lambda: [])
    hw = detect_hardware()
    import psutil

    assert hw.calibrated and hw.cpu_bandwidth == 20e9 and hw.runtime_rss == 280 * 2**20
    assert hw.ram_total == psutil.virtual_memory().total and hw.cores >= 1 and hw.cpu_name
    assert "RAM:" in hw.summary() and "20.0 GB/s" in hw.summary()


def test_uncalibrated_degrades_to_stated_assumption(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    hw = detect_hardware(measure=False)
    assert not hw.calibrated and any("not measured" in a for a in hw.assumptions)
    assert hw.cpu_bandwidth > 0


def test_calibration_is_cached_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(calibration, "calibrate", lambda gpus=None: calls.append(1) or dict(FIGURES))
    first, fresh = calibration.load_calibration([])
    second, fresh2 = calibration.load_calibration([])
    assert (fresh, fresh2, len(calls)) == (True, False, 1) and first == second
    calibration.load_calibration([], refresh=True)
    assert len(calls) == 2
    assert json.loads((tmp_path / "fit-calibration.json").read_text())[calibration._fingerprint([])] == FIGURES
    assert not list(tmp_path.glob(".*.tmp"))


def test_simulated_hardware():
    hw = make_hw(ram=32, cores=8)
    s = simulate(hw, ram=8, vram=24, cores=4)
    assert s.simulated and s.ram_available == 8 * GiB and s.gpu.vram_free == 24 * GiB
    assert s.cpu_matmul_fp32 == hw.cpu_matmul_fp32 / 2 and s.cores == 4
    assert hw.ram_available == 32 * GiB  # the original is untouched
    assert any("simulated GPU speed assumed" in a for a in s.assumptions)
    with pytest.raises(GptlabError, match="--vram -1 must be positive"):
        detect_hardware(measure=False, vram=-1)


def test_mig_uuids_from_nvidia_smi():
    out = ("GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-5c0d1f6a-1111-2222-3333-444455556666)\n"
           "  MIG 3g.40gb     Device  0: (UUID: MIG-1a2b3c4d-0001-0002-0003-0123456789ab)\n"
           "  MIG 3g.40gb     Device  1: (UUID: MIG-1a2b3c4d-0004-0005-0006-0123456789ac)\n")
    uuids = parse_mig_uuids(out)
    assert uuids == ["MIG-1a2b3c4d-0001-0002-0003-0123456789ab", "MIG-1a2b3c4d-0004-0005-0006-0123456789ac"]
    g = hardware.GPU("A100", 80 * GiB, 80 * GiB, "cuda", mig_uuids=uuids)
    assert g.cuda_visible_devices == ",".join(uuids)


def test_ollama_probe():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        assert ollama_running(port=port)
    finally:
        srv.close()
    assert not ollama_running(port=port, timeout=0.1)


def test_microbenchmarks_measure_something():
    assert benchmarks.measure_bandwidth(mib=32) > 1e8
    assert benchmarks.measure_matmul("fp32", n=256) > 1e8
    assert 0 < benchmarks.measure_op_latency() < 1e-2
