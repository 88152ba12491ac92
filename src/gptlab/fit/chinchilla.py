"""How long should I train? The compute-optimal view of ``gptlab fit --model M --train``.

Chinchilla (Hoffmann et al. 2022, https://arxiv.org/abs/2203.15556) found that
for a fixed compute budget loss is lowest with about 20 training tokens per
parameter. For a model of ``N`` parameters that is ``D = 20 N`` tokens and
``C = 6 N D`` FLOPs (2 per parameter per token forward, 4 backward).

The time is given two ways:

* **this machine**: the measured training throughput (``fit``'s calibrated
  matmul peak × its measured training MFU, over the FLOPs per token including
  attention; :func:`gptlab.fit.estimate.train_tokens_per_s`);
* **the GPUs of** :data:`GPUS`: ``C / (processes × dense bf16 peak × MFU)``, for
  1, 8 (one node), 16 (two nodes) and 64 processes, one GPU each, assuming the
  same MFU at every size (data parallel scaling is close to linear while the
  global batch stays efficient; communication is not modeled).
"""

from __future__ import annotations

from gptlab.fit.catalog import ModelSpec
from gptlab.fit.estimate import TRAIN_MFU, train_tokens_per_s
from gptlab.fit.hardware import Hardware

TOKENS_PER_PARAM = 20
PROCESS_COUNTS = (1, 8, 16, 64)

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s.
GPUS: dict[str, float] = {
    "T4 (fp16)": 65e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "A100": 312e12,
    "H100 SXM": 989e12,
    "H200": 989e12,
}


def _duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``7.1 h``, ``12 days``, ``3.4 years``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds < 730 * 86400:
        return f"{seconds / 86400:.0f} days"
    return f"{seconds / (365 * 86400):.1f} years"


def compute_optimal(spec: ModelSpec, hw: Hardware, context: int) -> dict:
    """Tokens, FLOPs and time to train ``spec`` compute-optimally, here and on the GPUs of :data:`GPUS`."""
    n = spec.params_total
    tokens = TOKENS_PER_PARAM * n
    flops = 6.0 * n * tokens
    here_gpu = hw.gpu
    precision = "bf16" if here_gpu is not None else "fp32"
    tps = train_tokens_per_s(spec, hw, context, precision, here_gpu)
    here = {"device": here_gpu.name if here_gpu is not None else f"CPU ({hw.cores} cores)",
            "precision": precision, "tokens_per_s": tps,
            "seconds": tokens / tps if tps > 0 else None}
    gpus = []
    for name, peak in GPUS.items():
        row = {"gpu": name, "peak_flops": peak, "seconds": {}}
        for p in PROCESS_COUNTS:
            row["seconds"][p] = flops / (p * peak * TRAIN_MFU["gpu"])
        gpus.append(row)
    return {"params": n, "tokens_per_param": TOKENS_PER_PARAM, "tokens": tokens, "flops": flops,
            "context": context, "mfu": TRAIN_MFU["gpu"], "this_machine": here, "gpus": gpus,
            "process_counts": list(PROCESS_COUNTS)}


def render_compute_optimal(c: dict) -> list[str]:
    """The plan view's lines for :func:`compute_optimal`."""
    here = c["this_machine"]
    when = _duration(here["seconds"]) if here["seconds"] else "-"
    lines = [f"Compute-optimal training (Chinchilla, ~{c['tokens_per_param']} tokens/parameter): "
             f"{c['tokens'] / 1e9:,.3g}B tokens, 6·N·D = {c['flops']:.3g} FLOPs",
             f"  this machine, {here['device']} {here['precision']}: {here['tokens_per_s']:,.0f} tok/s measured "
             f"-> {when} (1 process: processes here share the same cores)",
             f"  GPUs at {c['mfu']:.0%} MFU of the dense bf16 peak, by processes (one GPU each):",
             "    gpu          peak TFLOP/s  " + "  ".join(f"{p:>10}" for p in c["process_counts"])]
    for g in c["gpus"]:
        times = "  ".join(f"{_duration(g['seconds'][p]):>10}" for p in c["process_counts"])
        lines.append(f"    {g['gpu']:<12} {g['peak_flops'] / 1e12:>12.0f}  {times}")
    return lines
