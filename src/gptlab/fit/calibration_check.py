"""Are calibration figures believable? A pure check, run before figures are cached.

On a busy machine the microbenchmark can time one figure at a quiet moment and
the next in a crowd, or catch threads waiting for a core: the set it returns
then contradicts itself (all threads slower than one; a small model ranked
slower than a bigger one). The cache keeps figures for good, so a bad set
would mislead every later plan. ``calibration_problems`` says what is wrong
with a set of figures; it measures nothing (arithmetic on the numbers given,
tested with made-up figures). ``calibration.load_calibration`` re-measures a set
that has problems a few times, then falls back to the stated defaults.

The checks:

1. every figure is a finite number in a physically plausible range (``LIMITS``);
2. all threads are not slower than one: all-core bandwidth and fp32 matmul are
   at least ``1 - NOISE`` of the one-thread figures;
3. a square matmul is not slower in FLOP/s than the decode GEMV: it reuses each
   weight it loads n times, the GEMV uses each 4-byte weight for 2 FLOPs once
   (so matmul FLOP/s >= bandwidth / 2, within ``NOISE``);
4. the eager decode overhead per layer is at most ``OVERHEAD_PER_OP`` times
   what the layer's ops cost at the measured per-op latency (tiny models; a
   layer is ``EAGER_OPS`` ops);
5. the decode estimate is monotone in model size: within each preset family,
   at every quant and engine, a model that reads more bytes per token and does
   at least as many FLOPs is never estimated faster. (More bytes alone is not
   enough: Llama 2 7B reads more than Llama 3 8B at 1K tokens, its 32 KV heads,
   but does fewer FLOPs, and where FLOPs bound the step it is honestly faster.)
   This covers what the bandwidth curve and the matmul peaks decide; the
   per-layer eager term is left out, since a bigger model with fewer layers can
   honestly pay less of it, and check 4 covers it.
"""

from __future__ import annotations

import math
from itertools import combinations

GiB = 2**30

# Outer bounds, (low, high), far beyond any real machine's figure in either
# direction: a figure outside them is a timing accident, not a machine.
LIMITS: dict[str, tuple[float, float]] = {
    # bytes/s: a slow single-board computer ~1 GB/s; a GEMV from a huge L3 cache a few TB/s
    "cpu_bandwidth": (1e8, 1e13),
    "cpu_bandwidth_1core": (1e8, 1e13),
    # FLOP/s: an old single core ~1 GFLOP/s; a many-core AMX server ~0.5 PFLOP/s bf16
    "cpu_matmul_fp32": (1e8, 2e15),
    "cpu_matmul_fp32_1core": (1e8, 2e15),
    "cpu_matmul_bf16": (1e8, 2e15),
    # seconds per tiny eager op: PyTorch dispatch is ~1-20 us
    "op_latency": (1e-8, 1e-2),
    # bytes: python + torch + gptlab
    "runtime_rss": (16 * 2**20, 16 * GiB),
}
WIDTH_LIMITS = LIMITS["cpu_bandwidth"]  # each point of the bandwidth-by-width curve
OVERHEAD_LIMITS = {"per_layer": (0.0, 0.1), "fixed": (0.0, 1.0)}  # seconds per decode step
GPU_LIMITS = {"bandwidth": (1e9, 1e14), "matmul_bf16": (1e10, 1e17)}

# Repeated runs of one benchmark on a shared machine spread by about +-15 %;
# two figures are "in order" when the smaller is within 25 % of the larger.
NOISE = 0.25
# Measured per layer / (ops per layer x per-op latency): 1.1-1.6 on an idle
# machine with one thread; 50-60 with two threads fighting other jobs for
# two cores (threads waiting for a core, a few ms at a time).
OVERHEAD_PER_OP = 20.0


def calibration_problems(figures: dict) -> list[str]:
    """What is implausible or inconsistent in calibration ``figures``, one line each; [] if they are sane.

    ``figures`` is a ``benchmarks.calibrate()`` result (or a cached one); figures
    it lacks are not checked (older caches have no one-thread matmul).
    """
    problems = _range_problems(figures)
    if problems:  # the consistency checks below need numbers to compare
        return problems
    return _order_problems(figures) + _overhead_problems(figures) + _ranking_problems(figures)


def _fmt(key: str, v: float) -> str:
    if "bandwidth" in key:
        return f"{v / 1e9:.3g} GB/s"
    if "matmul" in key:
        return f"{v / 1e9:.3g} GFLOP/s"
    if key == "runtime_rss":
        return f"{v / 2**20:.0f} MiB"
    return f"{v:.3g} s"


def _out_of(key: str, v, lo: float, hi: float) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return f"{key} is {v!r}, not a number"
    if not lo <= v <= hi:
        return f"{key} {_fmt(key, v)} is outside the plausible {_fmt(key, lo)} .. {_fmt(key, hi)}"
    return None


def _range_problems(f: dict) -> list[str]:
    out = [_out_of(k, f[k], lo, hi) for k, (lo, hi) in LIMITS.items() if k in f]
    for width, v in (f.get("cpu_bandwidth_by_width") or {}).items():
        out.append(_out_of(f"cpu_bandwidth at width {width}", v, *WIDTH_LIMITS))
    for fam, parts in (f.get("decode_overhead") or {}).items():
        for part, (lo, hi) in OVERHEAD_LIMITS.items():
            out.append(_out_of(f"{fam} decode overhead {part}", parts.get(part), lo, hi))
    for name, g in (f.get("gpus") or {}).items():
        for k, (lo, hi) in GPU_LIMITS.items():
            out.append(_out_of(f"{name} {k}", g.get(k), lo, hi))
    return [p for p in out if p]


def _order_problems(f: dict) -> list[str]:
    out = []
    for all_key, one_key in (("cpu_bandwidth", "cpu_bandwidth_1core"), ("cpu_matmul_fp32", "cpu_matmul_fp32_1core")):
        if all_key in f and one_key in f and f[all_key] < (1 - NOISE) * f[one_key]:
            out.append(f"{all_key} {_fmt(all_key, f[all_key])} with all threads is below "
                       f"{_fmt(all_key, f[one_key])} with one")
    if "cpu_matmul_fp32" in f and "cpu_bandwidth" in f and f["cpu_matmul_fp32"] < (1 - NOISE) * f["cpu_bandwidth"] / 2:
        out.append(f"cpu_matmul_fp32 {_fmt('cpu_matmul_fp32', f['cpu_matmul_fp32'])} is below the decode GEMV's "
                   f"{_fmt('cpu_matmul_fp32', f['cpu_bandwidth'] / 2)} (2 FLOPs per 4-byte weight streamed)")
    return out


def _overhead_problems(f: dict) -> list[str]:
    from gptlab.fit.estimate import EAGER_OPS

    out = []
    lat = f.get("op_latency")
    for fam, parts in (f.get("decode_overhead") or {}).items():
        if lat is None or fam not in EAGER_OPS:
            continue
        ops = EAGER_OPS[fam][0]
        if parts["per_layer"] > OVERHEAD_PER_OP * ops * lat:
            out.append(f"{fam} decode overhead {parts['per_layer'] * 1e3:.3g} ms per layer is "
                       f"{parts['per_layer'] / (ops * lat):.0f}x its {ops} ops at {lat * 1e6:.3g} us/op "
                       f"(threads waiting for a core?)")
    return out


def _ranking_problems(f: dict) -> list[str]:
    """The first pair of presets (same family) where more bytes and FLOPs per token is estimated faster."""
    from gptlab.fit.catalog import catalog
    from gptlab.fit.estimate import ENGINES, bytes_per_token, decode_seconds, flops_per_token
    from gptlab.fit.hardware import Hardware, speeds_from
    from gptlab.fit.quant import QUALITY_LADDER

    # No eager term (op latency 0, no measured overhead): only what bandwidth and FLOPs decide.
    hw = Hardware(cpu_name="calibration check", cores=1, ram_total=0, ram_available=0, gpus=[],
                  unified_memory=False, ollama=False,
                  **{**speeds_from(f), "op_latency": 0.0, "decode_overhead": {}})
    specs = catalog()
    for engine, eng in ENGINES.items():
        for quant in (["F32"] + QUALITY_LADDER if eng.quantized_weights else ["F32", "BF16"]):
            rows = []
            for s in specs:
                ctx = min(1024, s.context_length)
                rows.append((s, bytes_per_token(s, quant, ctx), flops_per_token(s, ctx),
                             decode_seconds(s, hw, quant, ctx, engine)))
            for a, b in combinations(rows, 2):
                small, big = sorted((a, b), key=lambda r: r[1])
                if small[0].family != big[0].family or small[1] == big[1] or small[2] > big[2]:
                    continue  # other family, or not bigger in both bytes and FLOPs
                if small[3] > big[3] * (1 + 1e-9):
                    return [f"{big[0].name} reads {big[1] / small[1]:.3g}x the bytes per token of {small[0].name} "
                            f"but is estimated {small[3] / big[3]:.3g}x faster ({quant}, {engine}; widths "
                            f"{big[0].emb_dim} vs {small[0].emb_dim}; bandwidth by width {_curve(f)})"]
    return []


def _curve(f: dict) -> str:
    curve = sorted((int(k), v) for k, v in (f.get("cpu_bandwidth_by_width") or {}).items())
    if not curve:
        return "not measured"
    return ", ".join(f"{k}: {v / 1e9:.3g}" for k, v in curve) + " GB/s"
