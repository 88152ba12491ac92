"""A fixed, fully specified machine for the fit tests, so estimates are deterministic.

(A module of its own, not conftest.py: ``from conftest import`` picks whichever conftest pytest
imported first, and tests/data has one too.)"""

from __future__ import annotations

from gptlab.fit.hardware import GPU, Hardware

GiB = 2**30


def make_hw(ram: float = 32, vram: float | None = None, bandwidth: float = 50e9, cores: int = 8) -> Hardware:
    """A machine with round numbers: `ram`/`vram` GiB, `bandwidth` bytes/s, 1 TFLOP/s CPU."""
    gpus = [GPU("test GPU", int(vram * GiB), int(vram * GiB), "cuda", 1000e9, 100e12)] if vram else []
    return Hardware(cpu_name="test CPU", cores=cores, ram_total=int(ram * GiB), ram_available=int(ram * GiB),
                    gpus=gpus, unified_memory=False, ollama=False, cpu_bandwidth=bandwidth,
                    cpu_bandwidth_1core=bandwidth / 4, cpu_bandwidth_by_width={}, cpu_matmul_fp32=1e12, cpu_matmul_bf16=2e12,
                    op_latency=5e-6, decode_overhead={}, runtime_rss=300 * 2**20, calibrated=True)
