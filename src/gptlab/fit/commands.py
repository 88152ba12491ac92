"""``gptlab fit``: the ranked table, the plan for one model, the TUI and --verify."""

from __future__ import annotations

import json as _json
import sys

from gptlab.errors import GptlabError
from gptlab.fit.catalog import catalog, spec_from_ref
from gptlab.fit.calibration import detect_hardware
from gptlab.fit.plan import make_plan, rank, table_row
from gptlab.fit.render import render_plan, render_table, table_header


# --verify ran, but an estimate missed its target (2 is a usage error for every gptlab command).
EXIT_OUTSIDE_TARGETS = 3


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

    Returns 0; with --verify, 3 when an estimate is outside its target band.
    """
    _check_args(threads, batch, limit, tui, context, target_tps)
    hw = detect_hardware(calibrate_now=calibrate, ram=ram, vram=vram, cores=cores)
    if verify is not None:
        from gptlab.fit.verify import render_verify, verify_model

        res = verify_model(verify, hw, train=train, context=context, batch=batch if train else 1, threads=threads)
        print(_json.dumps(res, indent=2) if json else render_verify(res))
        return 0 if res["within_targets"] else EXIT_OUTSIDE_TARGETS
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
        print(_json.dumps({"hardware": hw.to_dict(), "context_requested": context,
                           "models": [r.to_dict() for r in rows]}, indent=2))
        return 0
    print(hw.summary())
    print(table_header(rows, engine, context))
    print(render_table(rows))
    for a in hw.assumptions:
        print(f"assumption: {a}", file=sys.stderr)
    return 0


def _check_args(threads: int | None, batch: int, limit: int | None, tui: bool, context: int | None,
                target_tps: float | None = None) -> None:
    """Refuse impossible flag values in one line each, before anything is measured."""
    if target_tps is not None and not target_tps > 0:
        raise GptlabError(f"--target-tps {target_tps} must be > 0 (decode tokens/s)")
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
