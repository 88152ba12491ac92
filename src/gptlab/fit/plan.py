"""Fit levels, run paths, hardware requirements and the ranked table.

Everything here is arithmetic on ``estimate``'s numbers; the rules are:

Fit level of a run path, from u = memory needed / memory available on it:
    Perfect    u <= 0.70
    Good       u <= 0.85
    Marginal   u <= 1.00
    Too tight  u >  1.00
and then capped: CPU offload is at best Marginal (every token crosses PCIe);
CPU-only on a machine with a discrete GPU is at best Marginal (the GPU would be
several times faster); a path slower than ``--target-tps`` is at best Marginal.
The model's fit is its best path's. Available memory is free VRAM for a GPU,
available RAM for the CPU, available RAM for Apple unified memory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from gptlab.errors import GptlabError
from gptlab.fit.catalog import ModelSpec
from gptlab.fit.chinchilla import compute_optimal
from gptlab.fit.estimate import (GiB, decode_tokens_per_s, get_engine, inference_memory,
                                 prefill_seconds, train_tokens_per_s, training_memory, check_quant)
from gptlab.fit.hardware import Hardware
from gptlab.fit.quant import QUALITY_LADDER

LEVELS = ["Perfect", "Good", "Marginal", "Too tight"]
THRESHOLDS = {"Perfect": 0.70, "Good": 0.85, "Marginal": 1.00}


def level_for(needed: float, available: float) -> str:
    """Fit level from memory needed vs. available (the thresholds above)."""
    if available <= 0:
        return "Too tight"
    u = needed / available
    for name, limit in THRESHOLDS.items():
        if u <= limit:
            return name
    return "Too tight"


def cap(level: str, at_best: str) -> str:
    """The worse of two levels."""
    return LEVELS[max(LEVELS.index(level), LEVELS.index(at_best))]


@dataclass
class RunPath:
    """One way to run the model here: on the GPU, split GPU/CPU, or CPU only."""

    name: str
    possible: bool
    fit: str
    tokens_per_s: float | None
    needed_gib: float
    available_gib: float
    resource: str  # "VRAM" | "RAM"
    note: str = ""


def _gpu_pool(hw: Hardware) -> float:
    g = hw.gpu
    if g is None:
        return 0.0
    return float(hw.ram_available if hw.unified_memory else g.vram_free)


def run_paths(spec: ModelSpec, hw: Hardware, quant: str, context: int, engine: str = "llama.cpp",
              kv_quant: str = "f16", batch: int = 1, target_tps: float | None = None) -> list[RunPath]:
    """GPU / CPU offload / CPU-only, each with its fit level and decode tokens/s."""
    mem = inference_memory(spec, hw, quant, context, batch, kv_quant, engine)
    paths = []
    g = hw.gpu
    if g is not None:
        pool = _gpu_pool(hw)
        need = mem.total if hw.unified_memory else mem.device
        tps = decode_tokens_per_s(spec, hw, quant, context, engine, g, kv_quant)
        fit = level_for(need, pool)
        paths.append(RunPath("GPU", fit != "Too tight", fit, tps, need / GiB, pool / GiB, "VRAM"))
        if not hw.unified_memory:
            paths.append(_offload_path(spec, hw, quant, context, engine, kv_quant, mem, pool, fit))
    else:
        paths.append(RunPath("GPU", False, "Too tight", None, mem.device / GiB, 0.0, "VRAM", "no GPU detected"))
    if not hw.unified_memory:
        fit = level_for(mem.cpu_total, hw.ram_available)
        if g is not None:
            fit = cap(fit, "Marginal")
        tps = decode_tokens_per_s(spec, hw, quant, context, engine, None, kv_quant)
        paths.append(RunPath("CPU-only", fit != "Too tight", fit, tps, mem.cpu_total / GiB, hw.ram_available / GiB,
                             "RAM"))
    if target_tps is not None:
        for p in paths:
            if p.possible and p.tokens_per_s is not None and p.tokens_per_s < target_tps:
                p.fit = cap(p.fit, "Marginal")
                p.note = (p.note + "; " if p.note else "") + f"below target {target_tps:g} tok/s"
    return paths


def _offload_path(spec, hw, quant, context, engine, kv_quant, mem, vram, gpu_fit) -> RunPath:
    if gpu_fit in ("Perfect", "Good"):
        return RunPath("CPU offload", False, "-", None, 0.0, 0.0, "VRAM", "not needed: fits on the GPU")
    if not get_engine(engine).quantized_weights:
        return RunPath("CPU offload", False, "-", None, 0.0, 0.0, "VRAM",
                       "gptlab's engine runs a model on one device; llama.cpp can split layers")
    # KV cache and compute stay on the GPU; the layers that do not fit run from RAM.
    room = 0.9 * vram - mem.kv_cache - mem.compute
    if room <= 0:
        return RunPath("CPU offload", False, "Too tight", None, mem.device / GiB, vram / GiB, "VRAM",
                       "the KV cache alone does not fit in VRAM")
    frac = min(1.0, room / mem.weights)
    ram_need = mem.weights * (1 - frac) + mem.runtime
    fit = cap(level_for(ram_need, hw.ram_available), "Marginal")
    t_gpu = 1 / decode_tokens_per_s(spec, hw, quant, context, engine, hw.gpu, kv_quant)
    t_cpu = 1 / decode_tokens_per_s(spec, hw, quant, context, engine, None, kv_quant)
    tps = 1 / (frac * t_gpu + (1 - frac) * t_cpu)
    return RunPath("CPU offload", fit != "Too tight", fit, tps, ram_need / GiB, hw.ram_available / GiB, "RAM",
                   f"{frac:.0%} of the weights on the GPU")


def best_path(paths: list[RunPath]) -> RunPath:
    """The path with the best fit level, then the highest tokens/s."""
    return min(paths, key=lambda p: (LEVELS.index(p.fit) if p.fit in LEVELS else 9, -(p.tokens_per_s or 0)))


def max_context(spec: ModelSpec, hw: Hardware, quant: str, engine: str = "llama.cpp", kv_quant: str = "f16",
                batch: int = 1, level: str = "Marginal") -> int:
    """Largest context (<= the model's) whose best run path still reaches ``level``; 0 if none."""
    def ok(ctx: int) -> bool:
        p = best_path(run_paths(spec, hw, quant, ctx, engine, kv_quant, batch))
        return LEVELS.index(p.fit) <= LEVELS.index(level)

    lo, hi = 0, spec.context_length
    if ok(hi):
        return hi
    while hi - lo > 1:  # memory grows monotonically with context
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def quants_for(engine: str, spec: ModelSpec | None = None) -> list[str]:
    """The weight formats an engine can hold: GGUF ladder (llama.cpp) or torch dtypes (gptlab).

    With a GGUF ``spec`` and an engine that keeps quantized weights, the file's
    own format comes first.
    """
    if not get_engine(engine).quantized_weights:
        return ["BF16", "INT8", "INT4", "F32"]  # F32 last: never the best fit, listed for --max-context
    if spec is not None and spec.native_weight_bytes is not None and spec.native_quant not in QUALITY_LADDER:
        return [spec.native_quant] + QUALITY_LADDER
    return QUALITY_LADDER


# ---------------------------------------------------------------- the plan view
@dataclass
class Plan:
    """Everything `gptlab fit --model REF` shows, as data."""

    model: dict
    hardware: str
    inputs: dict
    memory: dict
    decode_tokens_per_s: float | None
    prefill_seconds: float | None
    fit: str
    mode: str
    paths: list[RunPath]
    minimum: dict
    recommended: dict
    upgrades: list[dict]
    max_context: dict[str, int]
    training: list[dict] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    compute_optimal: dict | None = None  # with --train: Chinchilla tokens, FLOPs, time (gptlab.fit.chinchilla)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(self.memory)  # weights_gib, kv_cache_gib, total_gib at top level
        return d


def _cores_needed(hw: Hardware) -> int:
    """Cores that saturate the measured memory bandwidth: total ÷ one core's GEMV bandwidth.

    Decoding streams the weights, so past this many cores it does not get faster.
    """
    per_core = hw.cpu_bandwidth_1core or hw.cpu_bandwidth
    return max(2, math.ceil(hw.cpu_bandwidth / per_core))


def make_plan(spec: ModelSpec, hw: Hardware, context: int | None = None, quant: str | None = None,
              engine: str = "llama.cpp", kv_quant: str = "f16", batch: int = 1, target_tps: float | None = None,
              prompt_tokens: int = 512, train: bool = False, train_batch: int = 8,
              optimizer: str = "adamw") -> Plan:
    """The plan for one model: memory, speed, run paths, min/recommended hardware, upgrades."""
    ctx = min(spec.context_length, 8192) if context is None else context
    if ctx < 1:
        raise GptlabError(f"--context {ctx} must be at least 1")
    if ctx > spec.context_length:
        raise GptlabError(f"--context {ctx} exceeds {spec.name}'s maximum of {spec.context_length} tokens")
    eng = get_engine(engine)
    q = check_quant(spec, quant, eng) if quant else _default_quant(spec, hw, ctx, engine, kv_quant)
    mem = inference_memory(spec, hw, q, ctx, batch, kv_quant, engine)
    paths = run_paths(spec, hw, q, ctx, engine, kv_quant, batch, target_tps)
    best = best_path(paths)
    g = hw.gpu
    gpu_need = mem.total if hw.unified_memory else mem.device
    cores = _cores_needed(hw)
    ram = mem.runtime if g is not None and not hw.unified_memory else mem.cpu_total  # (unified: no VNNI)
    minimum = {"vram_gib": gpu_need / GiB, "ram_gib": ram / GiB, "ram_cpu_only_gib": mem.cpu_total / GiB,
               "cpu_cores": 1}
    rec = THRESHOLDS["Perfect"]
    recommended = {"vram_gib": gpu_need / rec / GiB, "ram_gib": ram / rec / GiB,
                   "ram_cpu_only_gib": mem.cpu_total / rec / GiB, "cpu_cores": cores}
    upgrades = upgrade_deltas(hw, best, gpu_need, mem.cpu_total)
    maxctx = {qq: max_context(spec, hw, qq, engine, kv_quant, batch) for qq in quants_for(engine, spec)
              if _quant_ok(spec, qq, eng)}
    pre = prefill_seconds(spec, hw, q, min(prompt_tokens, ctx), engine, g if best.name == "GPU" else None)
    training = training_rows(spec, hw, train_batch, ctx if ctx <= 4096 else 4096, optimizer) if train else []
    return Plan(
        model={"name": spec.name, "source": spec.source, "arch": spec.arch, "params": spec.params_total,
               "active_params": spec.params_active, "context_length": spec.context_length,
               "n_layers": spec.n_layers, "n_kv_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
               "sliding_window": spec.sliding_window, "native_quant": spec.native_quant},
        hardware=hw.summary(),
        inputs={"context": ctx, "quant": q, "kv_quant": kv_quant, "engine": engine, "batch": batch,
                "target_tps": target_tps, "prompt_tokens": min(prompt_tokens, ctx)},
        memory=mem.gib(), decode_tokens_per_s=best.tokens_per_s if best.possible else None,
        prefill_seconds=pre if best.possible else None, fit=best.fit, mode=best.name if best.possible else "-",
        paths=paths, minimum=minimum, recommended=recommended, upgrades=upgrades, max_context=maxctx,
        training=training, assumptions=list(hw.assumptions),
        compute_optimal=compute_optimal(spec, hw, min(ctx, 4096)) if train else None,
    )


def _quant_ok(spec: ModelSpec, quant: str, eng) -> bool:
    try:
        check_quant(spec, quant, eng)
        return True
    except GptlabError:
        return False


def _default_quant(spec: ModelSpec, hw: Hardware, ctx: int, engine: str, kv_quant: str) -> str:
    """A GGUF file's own format; otherwise the best-quality quant whose fit is the best any quant reaches here.

    llama.cpp runs a GGUF file as it is, so the file's format is the question
    asked; another format is a --quant away. The gptlab engine dequantizes
    every file, so for it the ladder applies to GGUF files too.
    """
    if spec.native_weight_bytes is not None and get_engine(engine).quantized_weights:
        return spec.native_quant
    ladder = quants_for(engine)
    levels = [best_path(run_paths(spec, hw, q, ctx, engine, kv_quant)).fit for q in ladder]
    top = min(LEVELS.index(lv) for lv in levels)
    return ladder[[LEVELS.index(lv) for lv in levels].index(top)]


def upgrade_deltas(hw: Hardware, best: RunPath, gpu_need: float, cpu_need: float) -> list[dict]:
    """Extra memory that lifts the fit to each better level ("+6.0 GiB VRAM -> Good")."""
    out = []
    if hw.gpu is not None:
        resource, need, have = ("RAM" if hw.unified_memory else "VRAM"), gpu_need, _gpu_pool(hw)
    else:
        resource, need, have = "RAM", cpu_need, float(hw.ram_available)
    current = LEVELS.index(best.fit) if best.fit in LEVELS else 3
    for level in ("Marginal", "Good", "Perfect"):
        if LEVELS.index(level) < current:
            extra = max(0.0, need / THRESHOLDS[level] - have)
            out.append({"resource": resource, "extra_gib": extra / GiB, "fit": level,
                        "text": f"+{extra / GiB:.1f} GiB {resource} -> {level}"})
    if hw.gpu is None:
        out.append({"resource": "VRAM", "extra_gib": gpu_need / THRESHOLDS["Perfect"] / GiB, "fit": "Perfect",
                    "text": f"a GPU with {gpu_need / THRESHOLDS['Perfect'] / GiB:.1f} GiB VRAM -> Perfect"})
    return out


def training_rows(spec: ModelSpec, hw: Hardware, batch: int, context: int, optimizer: str = "adamw") -> list[dict]:
    """Training memory, fit and tokens/s per precision, with and without activation checkpointing."""
    rows = []
    g = hw.gpu
    for precision in ("fp32", "bf16-mixed", "bf16"):
        for ckpt in (False, True):
            m = training_memory(spec, hw, batch, context, precision, optimizer, ckpt)
            if g is not None:
                need, pool, where = (m.total if hw.unified_memory else m.device), _gpu_pool(hw), "GPU"
            else:
                need, pool, where = m.total, float(hw.ram_available), "CPU"
            tps = train_tokens_per_s(spec, hw, context, precision, g) * (0.75 if ckpt else 1.0)
            rows.append({"precision": precision, "checkpointing": ckpt, "optimizer": optimizer, "batch": batch,
                         "context": context, "device": where, **m.gib(), "fit": level_for(need, pool),
                         "train_tokens_per_s": tps})
    return rows


# ---------------------------------------------------------------- the table
@dataclass
class Row:
    """One line of the ranked table."""

    name: str
    family: str
    source: str
    params: int
    active_params: int
    quant: str
    mode: str
    context: int
    weights_gib: float
    kv_cache_gib: float
    total_gib: float
    mem_pct: float
    decode_tokens_per_s: float | None
    fit: str

    def to_dict(self) -> dict:
        return asdict(self)


def table_row(spec: ModelSpec, hw: Hardware, context: int | None = None, engine: str = "llama.cpp",
              quant: str | None = None, kv_quant: str = "f16") -> Row:
    """The row for one model: best quant that fits well, its best run path and speed."""
    ctx = min(spec.context_length, 8192 if context is None else context)
    q = check_quant(spec, quant, get_engine(engine)) if quant else _default_quant(spec, hw, ctx, engine, kv_quant)
    mem = inference_memory(spec, hw, q, ctx, 1, kv_quant, engine)
    best = best_path(run_paths(spec, hw, q, ctx, engine, kv_quant))
    pct = 100 * best.needed_gib / best.available_gib if best.available_gib else float("inf")
    if not best.possible:  # nothing fits: report against RAM
        pct = 100 * mem.cpu_total / hw.ram_available
    total = mem.cpu_total if best.name == "CPU-only" or not best.possible else mem.total
    return Row(spec.name, spec.family, spec.source, spec.params_total, spec.params_active, q,
               best.name if best.possible else "-", ctx, mem.weights / GiB, mem.kv_cache / GiB, total / GiB,
               pct, best.tokens_per_s if best.possible else None, best.fit)


SORT_KEYS = {
    "fit": lambda r: (LEVELS.index(r.fit), -(r.decode_tokens_per_s or 0)),
    "tps": lambda r: -(r.decode_tokens_per_s or 0),
    "params": lambda r: -r.params,
    "mem": lambda r: r.total_gib,
    "name": lambda r: r.name.lower(),
    "context": lambda r: -r.context,
}


def parse_size(text: str) -> float:
    """'135M' / '7B' / '1.5b' / '500000' -> a parameter count."""
    t = str(text).strip().upper()
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(t[-1:], 1.0)
    try:
        return float(t[:-1] if t[-1:] in "KMBT" else t) * mult
    except ValueError:
        raise GptlabError(f"size {text!r} is not a parameter count; write e.g. 500M or 7B") from None


def rank(rows: list[Row], sort: str = "fit", family: str | None = None, fit: str | None = None,
         search: str | None = None, min_size: str | None = None, max_size: str | None = None) -> list[Row]:
    """Filter (family, fit level or better, name search, size range) and sort the table."""
    if sort not in SORT_KEYS:
        raise GptlabError(f"--sort {sort!r} must be one of {', '.join(SORT_KEYS)}")
    if fit is not None and fit.capitalize() not in [lv.capitalize() for lv in LEVELS]:
        raise GptlabError(f"--fit {fit!r} must be one of {', '.join(LEVELS)}")
    out = rows
    if family:
        out = [r for r in out if r.family.lower() == family.lower() or r.name.lower().startswith(family.lower())]
    if fit:
        limit = [lv.lower() for lv in LEVELS].index(fit.lower())
        out = [r for r in out if LEVELS.index(r.fit) <= limit]
    if search:
        out = [r for r in out if search.lower() in r.name.lower()]
    if min_size is not None:
        out = [r for r in out if r.params >= parse_size(min_size)]
    if max_size is not None:
        out = [r for r in out if r.params <= parse_size(max_size)]
    return sorted(out, key=SORT_KEYS[sort])
