"""Shared helpers for the benchmark scripts: timing and the measured matmul peak."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
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


def llama_cpp_missing() -> str | None:
    """Why the llama.cpp rows cannot run here (not installed, or its build dies on this CPU), or None.

    The check runs in a child process: a llama-cpp-python wheel built for another CPU (pip's cache
    keys the build by its source only) dies with SIGILL and would take the benchmark down with it.
    """
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (make llamacpp)"
    try:
        r = subprocess.run([sys.executable, "-c", "import llama_cpp; llama_cpp.llama_backend_init()"],
                           capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "llama-cpp-python did not start within 120 s here; rerun make llamacpp"
    if r.returncode == 0:
        return None
    why = "Illegal instruction: built for another CPU" if r.returncode == -signal.SIGILL else f"exit {r.returncode}"
    return f"llama-cpp-python cannot start on this CPU ({why}); rerun make llamacpp"
