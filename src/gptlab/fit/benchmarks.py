"""Microbenchmarks of this machine: what a decode step and a training step will see.

Published peak figures are what make fit estimates 3x off, so the speeds are
measured (a few seconds), then cached and checked by ``calibration``:

- memory bandwidth: the rate ``F.linear`` streams 256 MiB of fp32 weight
  matrices for one token's vector (what a decode step does), with all threads
  and with one (how many cores it takes to saturate memory), and as a curve
  over row length K = 512 ... 4096 (short rows stream slower: d = 576 reaches
  about 0.6 of d = 4096 here);
- matmul throughput: median of a few 2048x2048 fp32 and bf16 matmuls;
- per-op latency: the cost of one tiny PyTorch op (eager dispatch overhead);
- decode overhead: seconds per layer and per step of gptlab's eager decode on
  tiny models of each family (what dominates decoding of small models);
- runtime memory: RSS of a clean Python process after importing torch
  and gptlab (the fixed cost every gptlab process pays).
"""

from __future__ import annotations

import subprocess
import sys
import time

from gptlab.fit.hardware import GPU


def _median_time(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` runs after a warm-up.

    The median, not the best: decoding is a sustained stream, and on a shared
    machine the best run describes a moment nobody else was using the memory bus.
    """
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def measure_bandwidth(device: str = "cpu", mib: int = 256) -> float:
    """Bytes/s that decode-shaped matrix-vector products stream from fp32 weights.

    ``mib`` MiB of (4096 x 1024) and (1024 x 4096) matrices, each applied to one
    token's vector with ``F.linear`` — the kernel and shapes a decode step runs.
    """
    import torch
    import torch.nn.functional as F

    n = max(2, mib * 2**20 // (4096 * 1024 * 4))
    mats = [torch.randn(*((4096, 1024) if i % 2 else (1024, 4096)), device=device) for i in range(n)]
    xs = {1024: torch.randn(1, 1024, device=device), 4096: torch.randn(1, 4096, device=device)}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        for w in mats:
            F.linear(xs[w.shape[1]], w)
        sync()

    return sum(w.numel() * 4 for w in mats) / _median_time(run, 5)


WIDTHS = (512, 1024, 2048, 4096)


def measure_bandwidth_by_width(mib: int = 96) -> dict[str, float]:
    """Decode-GEMV bandwidth per row length K (bytes/s): short rows stream slower.

    For each K, ``mib`` MiB of (3K x K) fp32 matrices applied to a (1, K) vector
    with ``F.linear``. A model's projections have K = d (and K = F for the MLP
    down projection), so the estimator reads this curve at the model's width.
    """
    import torch
    import torch.nn.functional as F

    out = {}
    for K in WIDTHS:
        n = max(2, mib * 2**20 // (3 * K * K * 4))
        mats = [torch.randn(3 * K, K) for _ in range(n)]
        x = torch.randn(1, K)

        def run():
            for w in mats:
                F.linear(x, w)

        out[str(K)] = sum(w.numel() * 4 for w in mats) / _median_time(run, 5)
        del mats
    return out


def measure_matmul(dtype: str = "fp32", device: str = "cpu", n: int = 2048) -> float:
    """FLOP/s of an n x n matmul in ``dtype`` (best of a few)."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n = _affordable_size(dt, device, n, sync)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)

    def run():
        a @ b
        sync()

    return 2 * n**3 / _median_time(run, 5)


def _affordable_size(dt, device: str, n: int, sync, budget_s: float = 1.0) -> int:
    """``n``, halved while one n x n matmul would take over ``budget_s`` at the rate of a 512 x 512 one.

    A dtype the CPU has no instructions for (bf16 without AVX-512 BF16 / AMX) runs ~1 GFLOP/s:
    a 2048 matmul would take 13 s, six of them over a minute. A smaller one measures the same slow rate.
    """
    import torch

    m = min(n, 512)
    x = torch.randn(m, m, device=device, dtype=dt)
    rate = 2 * m**3 / max(_median_time(lambda: (x @ x, sync()), 3), 1e-9)
    while n > m and 2 * n**3 / rate > budget_s:
        n //= 2
    return n


def measure_op_latency() -> float:
    """Seconds per tiny eager op: the dispatch overhead of PyTorch on this CPU."""
    import torch

    x = torch.randn(1, 64)
    w = torch.randn(64, 64)

    def run():
        y = x
        for _ in range(200):
            y = torch.nn.functional.linear(y, w).add_(x)  # 2 ops per iteration
    return _median_time(run, 5) / 400


def measure_runtime_rss() -> int:
    """RSS (bytes) of a fresh process after importing what gptlab inference imports."""
    code = ("import gc, psutil, torch, gptlab.models.llama, gptlab.models.gpt2, gptlab.weights, gptlab.inference.generation\n"
            "gc.collect(); print(psutil.Process().memory_info().rss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed")
    return int(out.stdout.strip().splitlines()[-1])


def _one_thread(fn, *args):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(n)


def measure_decode_overhead(layers: tuple[int, int] = (1, 5), tokens: int = 12) -> dict[str, dict[str, float]]:
    """Seconds of eager overhead per decode step, per family: {family: {"per_layer", "fixed"}}.

    Times ``generate`` on two tiny models of each family (d=64, so the weights
    cost nothing) with different layer counts: the slope is the cost of running
    one layer's Python and kernel launches, the intercept the rest of a step
    (embedding, head, sampling). This is the runtime's overhead, not a model's.
    """
    import torch

    from gptlab.inference.generation import generate
    from gptlab.models import build_model, get_preset

    tiny = {"gpt2": get_preset("gpt2-nano").replace(emb_dim=64, n_heads=4, vocab_size=256, context_length=64),
            "llama": get_preset("llama-micro").replace(emb_dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128,
                                                      vocab_size=256, context_length=64)}
    out = {}
    for fam, cfg in tiny.items():
        per_step = []
        for L in layers:
            model = build_model(cfg.replace(n_layers=L)).eval()
            stamps: list[float] = []
            ids = torch.zeros(1, 4, dtype=torch.long)
            with torch.no_grad():
                generate(model, ids, 3)
                generate(model, ids, tokens, stream=lambda _t: stamps.append(time.perf_counter()))
            gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
            per_step.append(gaps[len(gaps) // 2])
        slope = max(0.0, (per_step[1] - per_step[0]) / (layers[1] - layers[0]))
        out[fam] = {"per_layer": slope, "fixed": max(0.0, per_step[0] - slope * layers[0])}
    return out


def measure_speeds() -> dict:
    """CPU bandwidth, matmul peaks, op latency and decode overhead with the current thread count."""
    return {
        "cpu_bandwidth": measure_bandwidth("cpu"),
        "cpu_bandwidth_by_width": measure_bandwidth_by_width(),
        "cpu_matmul_fp32": measure_matmul("fp32"),
        "cpu_matmul_bf16": measure_matmul("bf16"),
        "op_latency": measure_op_latency(),
        "decode_overhead": measure_decode_overhead(),
    }


def calibrate(gpus: list[GPU] | None = None) -> dict:
    """Run the microbenchmarks (a few seconds) and return the measured figures."""
    import torch

    res = {
        **measure_speeds(),
        "cpu_bandwidth_1core": _one_thread(measure_bandwidth, "cpu"),
        "cpu_matmul_fp32_1core": _one_thread(measure_matmul, "fp32"),  # for the check: all threads >= one
        "runtime_rss": measure_runtime_rss(),
        "torch_threads": torch.get_num_threads(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "gpus": {},
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            with torch.cuda.device(i):
                res["gpus"][torch.cuda.get_device_name(i)] = {
                    "bandwidth": measure_bandwidth("cuda", 1024),
                    "matmul_bf16": measure_matmul("bf16", "cuda", 4096),
                }
    return res
