"""The text views of ``gptlab fit``: the ranked table and the plan (the TUI shows the same strings)."""

from __future__ import annotations

from gptlab.fit.chinchilla import render_compute_optimal
from gptlab.fit.plan import Plan, Row


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
             f"= {p.memory['total_gib']:.2f} GiB" + (
                 f" (CPU-only: + {p.memory['cpu_packed_gib']:.2f} GiB of packed int4 copies = "
                 f"{p.memory['cpu_total_gib']:.2f} GiB)" if p.memory.get("cpu_packed_gib") else ""),
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
    if p.compute_optimal:
        lines += [""] + render_compute_optimal(p.compute_optimal)
    if p.assumptions:
        lines += ["", "Assumptions:"] + [f"  - {a}" for a in p.assumptions]
    return "\n".join(lines)


def table_header(rows: list[Row], engine: str, context: int | None) -> str:
    """The line above the table; says when ``--context`` was more than some models hold (their Ctx is their maximum)."""
    line = f"Models ({len(rows)}), engine {engine}"
    if context is not None:
        capped = sum(1 for r in rows if r.context < context)
        line += f", context {context} tokens"
        if capped:
            line += (f" (capped at the model's maximum for {capped} of {len(rows)}: "
                     "the Ctx column shows the context each row is sized for)")
    return line + ":"
