"""Shared helpers for the benchmark scripts: timing and the measured matmul peak."""

from __future__ import annotations

import time

import torch


def cpu_clock() -> float:
    """Seconds of CPU this process used, divided by torch's thread count: on a busy shared machine, what
    the wall clock would read if this process had its cores alone (other processes still share caches)."""
    return time.process_time() / torch.get_num_threads()


def matmul_peak(dtype: torch.dtype = torch.bfloat16, n: int = 2048, seconds: float = 2.0,
                clock=time.perf_counter) -> float:
    """Measured dense matmul throughput (FLOP/s) of this machine for `dtype`, timed by ``clock``."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    reps, t0 = 0, clock()
    while clock() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (clock() - t0)
