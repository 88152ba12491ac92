"""Shared helpers for the benchmark scripts: timing and the measured matmul peak."""

from __future__ import annotations

import time

import torch


def matmul_peak(dtype: torch.dtype = torch.bfloat16, n: int = 2048, seconds: float = 2.0) -> float:
    """Measured dense matmul throughput (FLOP/s) of this machine for `dtype`."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)
