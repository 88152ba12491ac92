"""``gptlab fit``: the ranked table, the plan for one model, the TUI and --verify."""

from __future__ import annotations

import json as _json
import sys

from gptlab.errors import GptlabError
from gptlab.fit.catalog import catalog, spec_from_ref
from gptlab.fit.hardware import detect_hardware
from gptlab.fit.plan import Plan, Row, make_plan, rank, table_row


def fmt_params(n: int) -> str:
    """135M / 7.2B style parameter count."""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def fmt_ctx(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 else str(n)


def fmt_tps(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t:.0f}" if t >= 100 else f"{t:.1f}"


TABLE_COLUMNS = ["Model", "Family", "Params", "tok/s", "Quant", "Mode", "Mem %", "Ctx", "Total GiB", "Fit"]


def row_cells(r: Row) -> list[str]:
    """The table columns of one row, formatted."""
    params = fmt_params(r.params) + (f" ({fmt_params(r.active_params)} act)" if r.active_params != r.params else "")
    return [r.name, r.family, params, fmt_tps(r.decode_tokens_per_s), r.quant, r.mode, f"{r.mem_pct:.0f}%",
            fmt_ctx(r.context), f"{r.total_gib:.2f}", r.fit]


def render_table(rows: list[Row]) -> str:
    """Rows as aligned text columns."""
    cells = [TABLE_COLUMNS] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_COLUMNS))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(widths))).rstrip() for c in cells)


def render_plan(p: Plan) -> str:
    """The plan view as text (the same data as --json)."""
    m, i = p.model, p.inputs
    own = " (the file's own)" if m["source"] == "gguf" and i["quant"] == m["native_quant"] else ""
    lines = [f"Plan: {m['name']}  ({fmt_params(m['params'])} params"
             + (f", {fmt_params(m['active_params'])} active" if m["active_params"] != m["params"] else "")
             + f", {m['arch']}, max context {fmt_ctx(m['context_length'])})",
             p.hardware, "",
             f"Inputs: context {i['context']} tokens | quant {i['quant']}{own} | KV cache {i['kv_quant']} | "
             f"engine {i['engine']} | target {i['target_tps'] or '<none>'} tok/s",
             f"Memory: weights {p.memory['weights_gib']:.2f} GiB + KV cache {p.memory['kv_cache_gib']:.2f} GiB "
             f"+ compute {p.memory['compute_gib']:.2f} GiB + runtime {p.memory['runtime_gib']:.2f} GiB "
             f"= {p.memory['total_gib']:.2f} GiB",
             f"Speed: decode {fmt_tps(p.decode_tokens_per_s)} tok/s, prefill of {i['prompt_tokens']} tokens "
             + (f"{p.prefill_seconds:.2f} s" if p.prefill_seconds is not None else "-"),
             f"Fit: {p.fit} ({p.mode})", "", "Run paths:"]
    for r in p.paths:
        ok = "yes" if r.possible else "no"
        mem = f"{r.needed_gib:.2f}/{r.available_gib:.1f} GiB {r.resource}" if r.needed_gib else ""
        lines.append(f"  - {r.name}: {ok}  tps={fmt_tps(r.tokens_per_s)}  fit={r.fit}  {mem}"
                     + (f"  ({r.note})" if r.note else ""))
    mn, rc = p.minimum, p.recommended
    lines += ["", f"Minimum hardware:     VRAM {mn['vram_gib']:.1f} GiB (GPU path) | RAM {mn['ram_cpu_only_gib']:.1f} GiB "
                  f"(CPU-only) | CPU {mn['cpu_cores']} cores",
              f"Recommended hardware: VRAM {rc['vram_gib']:.1f} GiB | RAM {rc['ram_cpu_only_gib']:.1f} GiB | "
              f"CPU {rc['cpu_cores']} cores", "",
              "Largest context that fits: " + ", ".join(f"{q} {fmt_ctx(c) if c else 'none'}"
                                                        for q, c in p.max_context.items())]
    if p.upgrades:
        lines += ["", "Upgrade deltas:"] + [f"  - {u['text']}" for u in p.upgrades]
    if p.training:
        lines += ["", f"Training (batch {p.training[0]['batch']} x {p.training[0]['context']} tokens, "
                      f"{p.training[0]['optimizer']}):",
                  "  precision   ckpt  weights  grads  optim  activ  total GiB  fit        tok/s"]
        for t in p.training:
            lines.append(f"  {t['precision']:<10}  {'yes' if t['checkpointing'] else 'no ':<4}  "
                         f"{t['weights_gib']:7.2f}  {t['gradients_gib']:5.2f}  {t['optimizer_gib']:5.2f}  "
                         f"{t['activations_gib']:5.2f}  {t['total_gib']:9.2f}  {t['fit']:<9}  "
                         f"{fmt_tps(t['train_tokens_per_s'])}")
    if p.assumptions:
        lines += ["", "Assumptions:"] + [f"  - {a}" for a in p.assumptions]
    return "\n".join(lines)


def _is_tty(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (ValueError, AttributeError):  # closed or not a file
        return False


def fit_command(model: str | None = None, context: int | None = None, quant: str | None = None,
                kv_quant: str = "f16", engine: str = "llama.cpp", target_tps: float | None = None,
                train: bool = False, batch: int = 8, optimizer: str = "adamw", add: list[str] | None = None,
                sort: str = "fit", family: str | None = None, fit: str | None = None, search: str | None = None,
                min_size: str | None = None, max_size: str | None = None, limit: int | None = None,
                json: bool = False, tui: bool = False, calibrate: bool = False, verify: str | None = None,
                ram: float | None = None, vram: float | None = None, cores: int | None = None,
                threads: int | None = None) -> int:
    """Will a model fit on this machine, and how fast will it run? (inference and training)

    Without --model: a table of models (gptlab presets plus --add refs) ranked for
    this machine. With --model: the plan for one model. Memory and speed come from
    one estimator fed by a measured microbenchmark of this machine (cached; see
    --calibrate). Rules and formulas: docs/fit.md.

    Args:
        model: plan view for this model: a preset name, gptlab run/model dir, HF
            config.json or dir, .gguf file, or pkg:PACKAGE/FILE.
        context: context length in tokens (default: the model's, at most 8192).
        quant: weight format: F32, BF16, F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0,
            Q4_1, Q3_K_M, Q2_K ... (default: a GGUF file's own format; otherwise
            the best quality that fits well).
        kv_quant: KV-cache element format: f32, f16, bf16, q8_0, q4_0.
        engine: llama.cpp (quantized weights stay quantized, as in Ollama) or
            gptlab (this package's PyTorch runtime; weights dequantized to F32/BF16).
        target_tps: decode tokens/s you need; slower paths are at best Marginal.
        train: also size training (weights, gradients, optimizer, activations).
        batch: training batch size (sequences) for --train.
        optimizer: adamw, sgd, sgd-momentum or lion (for --train).
        add: extra model refs to include in the table.
        sort: table order: fit, tps, params, mem, name, context.
        family: only this family (gpt2, llama, ...) or name prefix.
        fit: only models at this fit level or better (Perfect, Good, Marginal).
        search: only models whose name contains this text.
        min_size: smallest parameter count to list, e.g. 500M.
        max_size: largest parameter count to list, e.g. 8B.
        limit: show at most this many rows.
        json: print JSON instead of text.
        tui: open the interactive terminal UI (table, sort/filter/search, plan panel).
        calibrate: re-run the hardware microbenchmark and refresh the cache.
        verify: load this model here, decode (and train with --train) in a clean
            subprocess, and print estimated vs measured memory and speed.
        ram: simulate this much RAM (GiB).
        vram: simulate a GPU with this much VRAM (GiB).
        cores: simulate this many CPU cores.
        threads: torch threads for --verify (default: torch's; 1 is steadier on a busy machine).
    """
    if threads is not None and threads < 1:
        raise GptlabError(f"--threads {threads} must be at least 1")
    if batch < 1:
        raise GptlabError(f"--batch {batch} must be at least 1")
    if limit is not None and limit < 1:
        raise GptlabError(f"--limit {limit} must be at least 1")
    if tui and not (_is_tty(sys.stdin) and _is_tty(sys.stdout)):  # a TUI on a pipe writes escapes and hangs
        which = " and ".join(n for n, f in (("stdin", sys.stdin), ("stdout", sys.stdout)) if not _is_tty(f))
        raise GptlabError(f"--tui needs an interactive terminal, but {which} "
                          f"{'is' if ' and ' not in which else 'are'} not one (piped or redirected); "
                          "run it in a terminal, or drop --tui for the plain table (--json for scripts)")
    if context is not None and context < 1:
        raise GptlabError(f"--context {context} must be at least 1 token (omit it for the model's own, at most 8192)")
    hw = detect_hardware(calibrate_now=calibrate, ram=ram, vram=vram, cores=cores)
    if verify is not None:
        from gptlab.fit.verify import render_verify, verify_model

        res = verify_model(verify, hw, train=train, context=context, batch=batch if train else 1, threads=threads)
        print(_json.dumps(res, indent=2) if json else render_verify(res))
        return 0 if res["within_targets"] else 2
    if tui:
        from gptlab.fit.tui import run_tui

        run_tui(hw, extra_refs=add or [], engine=engine, context=context)
        return 0
    if model is not None:
        plan = make_plan(spec_from_ref(model), hw, context=context, quant=quant, engine=engine,
                         kv_quant=kv_quant, target_tps=target_tps, train=train, train_batch=batch,
                         optimizer=optimizer)
        print(_json.dumps(plan.to_dict(), indent=2) if json else render_plan(plan))
        return 0
    rows = [table_row(s, hw, context, engine, quant, kv_quant) for s in catalog(add)]
    rows = rank(rows, sort, family, fit, search, min_size, max_size)[:limit]
    if json:
        print(_json.dumps({"hardware": hw.to_dict(), "models": [r.to_dict() for r in rows]}, indent=2))
    else:
        print(hw.summary())
        print(f"Models ({len(rows)}), engine {engine}:")
        print(render_table(rows))
        for a in hw.assumptions:
            print(f"assumption: {a}", file=sys.stderr)
    return 0
