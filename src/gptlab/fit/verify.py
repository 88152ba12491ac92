"""Measured against reality: estimated vs. measured peak RSS and tokens/s.

``verify_model(ref)`` runs the model *here*, in gptlab's own runtime, in a
fresh subprocess (so the measured peak RSS belongs to a clean process, not to
whatever the caller already imported), and compares with what the estimator
predicted for exactly that run:

- inference: load the weights (fp32: gptlab dequantizes GGUF blocks), reset the
  peak-RSS counter (Linux ``/proc/self/clear_refs``), decode ``new_tokens``
  greedily after a ``prompt``-token prompt, read the peak RSS (``VmHWM``) and
  the decode rate from the streamed tokens' timestamps. The load itself peaks
  higher (file + tensors in flight); that figure is reported separately and is
  not what the estimate sizes.
- training (``train=True``): AdamW steps on random tokens at ``batch`` x
  ``context``; peak RSS over steps 2-3 (when optimizer state exists) and the
  tokens/s of those steps.

Targets: memory within ±15 %, decode within ±30 %, training memory within ±20 %.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

from gptlab.errors import GptlabError
from gptlab.fit.catalog import spec_from_ref
from gptlab.fit.estimate import GiB, decode_tokens_per_s, inference_memory, train_tokens_per_s, training_memory
from gptlab.fit.hardware import Hardware

TARGETS = {"memory": 0.15, "decode": 0.30, "train_memory": 0.20}


# ---------------------------------------------------------------- the child process
def _vmhwm() -> int:
    """Peak resident set size of this process so far, in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(args: dict) -> dict:
    import gc
    import time

    import torch

    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    if args["mode"] == "speeds":
        from gptlab.fit.benchmarks import measure_speeds

        return measure_speeds()
    out: dict = {}
    if args["preset"]:
        from gptlab.models import build_model, get_preset

        model = build_model(get_preset(args["ref"]))
    else:
        from gptlab.weights import load_model

        model = load_model(args["ref"], dtype="fp32")
    gc.collect()
    out["load_peak_bytes"] = _vmhwm()
    out["peak_reset"] = _reset_peak()
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    if args["mode"] == "decode":
        from gptlab.inference.generation import generate

        ids = torch.randint(0, V, (1, args["prompt"]), generator=g)
        with torch.no_grad():
            generate(model, ids, 4)  # warm-up
            stamps: list[float] = []
            generate(model, ids, args["new_tokens"], stream=lambda _t: stamps.append(time.perf_counter()))
        out["decode_tokens_per_s"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    else:
        import torch.nn.functional as F

        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        x = torch.randint(0, V, (args["batch"], args["context"]), generator=g)
        y = torch.randint(0, V, (args["batch"], args["context"]), generator=g)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
        out["train_tokens_per_s"] = args["batch"] * args["context"] / (sum(times[1:]) / 2)
    out["peak_bytes"] = _vmhwm()
    if args["mode"] == "decode":  # peak already read: now the benchmark cannot inflate it
        from gptlab.fit.benchmarks import measure_speeds

        out["speeds_after"] = measure_speeds()
    return out


def _mean_speeds(a: dict, b: dict) -> dict:
    """Average two measure_speeds() results, field by field (nested dicts too)."""
    return {k: _mean_speeds(v, b[k]) if isinstance(v, dict) else (v + b[k]) / 2 for k, v in a.items()}


def _run_child(args: dict, timeout: float = 900) -> dict:
    code = "import json, sys; from gptlab.fit.verify import _child; print(json.dumps(_child(json.loads(sys.argv[1]))))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        raise GptlabError(f"--verify could not run {args['ref']} here: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- compare
def _err(est: float, meas: float) -> float:
    """Relative error of the estimate: (estimated - measured) / measured."""
    return (est - meas) / meas


def verify_model(ref: str, hw: Hardware, train: bool = False, context: int | None = None, batch: int = 1,
                 prompt: int = 64, new_tokens: int = 32, threads: int | None = None) -> dict:
    """Measure one model's decode (and training) run in a clean subprocess; compare with the estimate.

    Just before (in another child: its buffers would inflate the RSS) and just
    after the decode (in the same child, once its peak was read) bandwidth,
    matmul peak and decode overhead are re-measured with the same thread count;
    the estimate uses their average (``speeds`` in the result), so estimate and
    measurement see the same machine load.
    """
    spec = spec_from_ref(ref)
    preset = spec.source == "preset"
    ctx = min(spec.context_length, prompt + new_tokens)
    prompt = min(prompt, max(1, ctx - new_tokens))
    # The run being predicted: fp32 weights and fp32 KV cache sized prompt + new tokens.
    speeds = _run_child({"ref": ref, "preset": preset, "mode": "speeds", "threads": threads})
    m = _run_child({"ref": ref, "preset": preset, "mode": "decode", "prompt": prompt, "new_tokens": new_tokens,
                    "threads": threads})
    # Speeds measured just before and just after the decode, averaged: on a shared
    # machine the load changes within seconds; bracketing the run in time is fairer.
    speeds = _mean_speeds(speeds, m["speeds_after"])
    hw = replace(hw, **speeds)
    mem = inference_memory(spec, hw, "F32", ctx, 1, "f32", engine="gptlab")
    est_tps = decode_tokens_per_s(spec, hw, "F32", ctx, engine="gptlab", kv_quant="f32")
    res = {
        "model": spec.name, "engine": "gptlab", "dtype": "fp32", "context": ctx, "prompt": prompt,
        "new_tokens": new_tokens, "threads": threads, "hardware": hw.summary(), "speeds": speeds,
        "estimated": {**mem.gib(), "decode_tokens_per_s": est_tps},
        "measured": {"peak_rss_gib": m["peak_bytes"] / GiB, "load_peak_rss_gib": m["load_peak_bytes"] / GiB,
                     "decode_tokens_per_s": m["decode_tokens_per_s"], "peak_reset": m["peak_reset"]},
    }
    errors = {"memory": _err(mem.total, m["peak_bytes"]),
              "decode": _err(est_tps, m["decode_tokens_per_s"])}
    if train:
        tctx = min(spec.context_length, context or 128)
        t = _run_child({"ref": ref, "preset": preset, "mode": "train", "batch": batch, "context": tctx,
                        "threads": threads})
        thw = hw
        tm = training_memory(spec, thw, batch, tctx, "fp32", "adamw", False)
        est_train_tps = train_tokens_per_s(spec, thw, tctx, "fp32")
        res["estimated"]["training"] = {**tm.gib(), "train_tokens_per_s": est_train_tps, "batch": batch,
                                        "context": tctx}
        res["measured"]["training"] = {"peak_rss_gib": t["peak_bytes"] / GiB,
                                       "train_tokens_per_s": t["train_tokens_per_s"]}
        errors["train_memory"] = _err(tm.total, t["peak_bytes"])
        errors["train_tokens_per_s"] = _err(est_train_tps, t["train_tokens_per_s"])
    res["errors"] = errors
    res["targets"] = TARGETS
    res["within_targets"] = all(abs(errors[k]) <= v for k, v in TARGETS.items() if k in errors)
    return res


def render_verify(res: dict) -> str:
    """Estimated vs measured, one line per quantity, with the error and the target."""
    e, m, err = res["estimated"], res["measured"], res["errors"]

    def line(label: str, est: float, meas: float, key: str, unit: str) -> str:
        target = TARGETS.get(key)
        mark = "" if target is None else ("  ok" if abs(err[key]) <= target else f"  OUTSIDE ±{target:.0%}")
        return f"  {label:<22} est {est:9.3f} {unit:<6} measured {meas:9.3f} {unit:<6} error {err[key]:+6.1%}{mark}"

    lines = [f"Verify {res['model']} in gptlab ({res['dtype']}, prompt {res['prompt']} + {res['new_tokens']} "
             f"new tokens)", res["hardware"],
             line("peak RSS (decode)", e["total_gib"], m["peak_rss_gib"], "memory", "GiB"),
             line("decode", e["decode_tokens_per_s"], m["decode_tokens_per_s"], "decode", "tok/s"),
             f"  (load peak RSS {m['load_peak_rss_gib']:.3f} GiB; weights {e['weights_gib']:.3f} + KV "
             f"{e['kv_cache_gib']:.4f} + compute {e['compute_gib']:.3f} + runtime {e['runtime_gib']:.3f} GiB)"]
    if "training" in e:
        te, tm = e["training"], m["training"]
        lines += [f"  training: AdamW fp32, batch {te['batch']} x {te['context']} tokens",
                  line("peak RSS (train)", te["total_gib"], tm["peak_rss_gib"], "train_memory", "GiB"),
                  line("train tokens/s", te["train_tokens_per_s"], tm["train_tokens_per_s"],
                       "train_tokens_per_s", "tok/s")]
    lines.append("within targets" if res["within_targets"] else "OUTSIDE targets")
    return "\n".join(lines)
