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


def test_a_slow_dtype_is_measured_on_a_smaller_matmul():
    """bf16 on a CPU without bf16 instructions runs ~1 GFLOP/s: the 2048 matmul (13 s a run) shrinks."""
    import torch

    def fake_clock():  # every timed call looks like 1 s: far over any budget
        fake_clock.t += 1.0
        return fake_clock.t
    fake_clock.t = 0.0
    real = benchmarks.time.perf_counter
    try:
        benchmarks.time.perf_counter = fake_clock
        assert benchmarks._affordable_size(torch.float32, "cpu", 2048, lambda: None) == 512
    finally:
        benchmarks.time.perf_counter = real
    assert benchmarks._affordable_size(torch.float32, "cpu", 2048, lambda: None, budget_s=1e9) == 2048


# ---- MIG slices: recorded nvidia-smi -L outputs (tests/assets/nvidia-smi) and NVML answers ------------

def _recorded(name: str) -> str:
    from pathlib import Path

    return (Path(__file__).parent.parent / "assets" / "nvidia-smi" / name).read_text()


def test_mig_slices_from_nvidia_smi_are_gpus_of_their_own(monkeypatch):
    from gptlab import mig

    monkeypatch.setattr(hardware, "_nvml_gpus", lambda notes: [])
    monkeypatch.setattr(hardware, "_amd_gpus", lambda: [])
    monkeypatch.setattr(mig, "nvidia_smi_listing", lambda timeout=5.0: _recorded("a100-40gb-mig.txt"))
    notes: list[str] = []
    gpus, unified = hardware.detect_devices(notes)
    assert [(g.name, g.vram_total // GiB, g.device) for g in gpus] == [
        ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", 20, "mig:0"), ("NVIDIA A100-SXM4-40GB MIG 2g.10gb", 10, "mig:1"),
        ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", 5, "mig:2"), ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", 5, "mig:3")]
    assert gpus[1].cuda_visible_devices == "MIG-cba663e8-9bed-5b25-b243-5985ef7c9beb" and not unified
    assert any("profile names" in n for n in notes)


class _FakeNVML:
    """NVML as it answers on an H100 80GB with MIG on (4g.40gb + 1g.10gb) next to a whole H100."""

    class NVMLError(Exception):
        pass

    MIB = 2**20
    GPUS = [("NVIDIA H100 80GB HBM3", "GPU-b3a1c9d2-6e4f-8a7b-1c2d-3e4f5a6b7c8d", 81559 * MIB, True),
            ("NVIDIA H100 80GB HBM3", "GPU-e2d1c0b9-a8f7-e6d5-c4b3-a2f1e0d9c8b7", 81559 * MIB, False)]
    SLICES = [("NVIDIA H100 80GB HBM3 MIG 4g.40gb", "MIG-0e7c5b3a-1f2d-5c4b-8a9e-7d6c5b4a3f2e", 40448 * MIB, 40000 * MIB),
              ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "MIG-7f6e5d4c-3b2a-5190-8f7e-6d5c4b3a2f1e", 9984 * MIB, 9900 * MIB)]

    def __init__(self):
        from types import SimpleNamespace

        self.mem = lambda total, free: SimpleNamespace(total=total, free=free, used=total - free)

    def nvmlInit(self): pass
    def nvmlShutdown(self): pass
    def nvmlDeviceGetCount(self): return len(self.GPUS)
    def nvmlDeviceGetHandleByIndex(self, i): return ("gpu", i)
    def nvmlDeviceGetName(self, h): return (self.GPUS[h[1]] if h[0] == "gpu" else self.SLICES[h[1]])[0].encode()
    def nvmlDeviceGetUUID(self, h): return (self.GPUS[h[1]] if h[0] == "gpu" else self.SLICES[h[1]])[1]
    def nvmlDeviceGetMaxMigDeviceCount(self, h): return 7

    def nvmlDeviceGetMemoryInfo(self, h):
        if h[0] == "gpu":
            return self.mem(self.GPUS[h[1]][2], self.GPUS[h[1]][2] - 600 * self.MIB)
        return self.mem(*self.SLICES[h[1]][2:])

    def nvmlDeviceGetMigMode(self, h): return (1, 1) if self.GPUS[h[1]][3] else (0, 0)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, j):
        if j >= len(self.SLICES):
            raise self.NVMLError("Not Found")
        return ("mig", j)


def test_mig_slices_from_nvml_with_their_memory(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", _FakeNVML())
    gpus = hardware._nvml_gpus([])
    assert [(g.name, g.vram_total // 2**20, g.vram_free // 2**20, g.device) for g in gpus] == [
        ("NVIDIA H100 80GB HBM3 MIG 4g.40gb", 40448, 40000, "mig:0"),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 9984, 9900, "mig:1"),
        ("NVIDIA H100 80GB HBM3", 81559, 80959, None)]
    assert gpus[0].mig_uuids == ["MIG-0e7c5b3a-1f2d-5c4b-8a9e-7d6c5b4a3f2e"]


def test_fit_shows_each_slice_with_its_memory(tmp_path, monkeypatch, capsys):
    from gptlab import mig
    from gptlab.cli import run

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "_nvml_gpus", lambda notes: [])
    monkeypatch.setattr(hardware, "_amd_gpus", lambda: [])
    monkeypatch.setattr(mig, "nvidia_smi_listing", lambda timeout=5.0: _recorded("h100-80gb-mixed.txt"))
    slices = hardware.slice_gpus(mig.parse_nvidia_smi_l(_recorded("h100-80gb-mixed.txt")))
    (tmp_path / "fit-calibration.json").write_text(json.dumps({calibration._fingerprint(slices): FIGURES}))
    assert run(["fit", "--family", "smollm2", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "GPU: NVIDIA H100 80GB HBM3 MIG 4g.40gb (40.0 GiB free / 40.0 GiB)" in out
    assert ("MIG slices: mig:0 NVIDIA H100 80GB HBM3 MIG 4g.40gb 40.0 GiB (MIG-0e7c5b3a-1f2d-5c4b-8a9e-7d6c5b4a3f2e), "
            "mig:1 NVIDIA H100 80GB HBM3 MIG 2g.20gb 20.0 GiB") in out
    assert "the plan is for mig:0, the largest; --device mig:0 sets CUDA_VISIBLE_DEVICES=MIG-0e7c5b3a" in out
