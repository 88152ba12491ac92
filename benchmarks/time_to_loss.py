"""Time to loss: nanoGPT's Tiny Shakespeare character recipe, whole-process wall time to a validation loss.

The recipe (nanoGPT ``config/train_shakespeare_char.py`` with its README's CPU flags): characters as
tokens (65), the first 90% of the text to train on, the last 10% to validate on; GPT 4 layers, 4 heads,
width 128, context 64, batch 12, 2,000 iterations, AdamW lr 1e-3 cosine to 1e-4 after 100 warmup steps,
beta2 0.99, weight decay 0.1, clip 1.0, dropout 0, the exact (erf) GELU of ``nn.GELU()`` (``--mlp-act
gelu_tanh``: GPT-2's own tanh approximation, 2.7x slower on an AVX2 CPU). The loss is measured as
nanoGPT's ``estimate_loss`` does: the mean over 20 random (12 x 64) batches of the validation text,
every ``--eval-every`` steps. nanoGPT's own code ran it on a quiet 2-core Zen 5 (AVX-512) in 84 s to a
validation loss of 1.886; ``--nanogpt-dir`` measures it on this CPU in the same run.

Each side runs in its own process, timed from the moment it is started (Python start-up, imports,
reading the text, building the model, training, every evaluation) to the evaluation that first reaches
``--target``, and to its exit. gptlab stops there (``TrainConfig.target_loss``, ``gptlab train
--target-loss``), and so does the transformers loop; nanoGPT's ``train.py`` has no such stop and runs its
2,000 steps (its recipe reaches the target at its last evaluation):

- gptlab: ``gptlab.training.train_loop`` (its run directory, checkpoints and plots included);
- transformers: ``GPT2LMHeadModel`` of the same shape in a plain PyTorch loop with the same schedule;
- nanogpt (with ``--nanogpt-dir``, a checkout of github.com/karpathy/nanoGPT): its own ``train.py``
  with its README's CPU command, on this machine in the same run. Its data is prepared first
  (``data/shakespeare_char/prepare.py`` on the same text, untimed, as its README does it before training).

The recipe may change for speed as long as the loss is measured the same way (``--batch``, ``--lr``,
``--min-lr``, ``--warmup``, ``--beta1``, ``--steps``, ``--precision``, ``--threads``, ``--compile``). The
defaults are the fastest recipe measured: lr 4e-3 after 50 warmup steps, cosine to lr/10 over 1,100 steps,
AdamW's beta1 0.7 (nanoGPT: 0.9), the CPU's physical cores as threads. With five seeds (``--seed``) it
was at 1.864-1.880 by the evaluation at step 1,000 (0.77M tokens, 50% of nanoGPT's 1.54M). (At 1,000
steps with beta1 0.9 every schedule tried ended at 1.89-1.95: cosine or linear to zero,
warmup-stable-decay, lr 3e-3 to 6e-3, batch 16.) ``--nanogpt`` runs nanoGPT's own recipe (lr 1e-3,
2,000 steps, beta1 0.9) on gptlab instead.

    python benchmarks/time_to_loss.py [--sides gptlab,hf] [--nanogpt-dir ~/nanoGPT] [--nanogpt | --steps 1100 --lr 4e-3 --beta1 0.7]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(os.environ.get("GPTLAB_SHARED_DATA", "/work/shared/data")) / "tinyshakespeare.txt"
TARGET = 1.886
STEPS, BETA1 = 1100, 0.7  # the default recipe (see the module's doc)


def _text() -> str:
    """Tiny Shakespeare: the test data's copy where it exists, else gptlab's own download (checksummed)."""
    if DATA.is_file():
        return DATA.read_text(encoding="utf-8")
    from gptlab.data.corpus import load_corpus

    return load_corpus("tinyshakespeare")


def _char_data():
    """nanoGPT's data/shakespeare_char/prepare.py: sorted characters as ids, 90% / 10% split."""
    import numpy as np

    codes = np.frombuffer(_text().encode("utf-32-le"), dtype=np.uint32)  # one code point per character
    chars = np.flatnonzero(np.bincount(codes))  # the characters that occur, sorted: sorted(set(text))
    lookup = np.zeros(int(chars[-1]) + 1, dtype=np.int64)
    lookup[chars] = np.arange(len(chars))
    ids = lookup[codes]
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:], len(chars)


def _report(step: int, val: float, t0: float) -> None:
    print(json.dumps({"step": step, "val_loss": val, "t": time.time() - t0}), flush=True)


def gptlab_worker(a, t0: float) -> None:
    """The recipe through gptlab's one training loop."""
    import tempfile

    import torch

    from gptlab.models import build_model
    from gptlab.models.gpt2 import GPT2Config
    from gptlab.training import TrainConfig, train_loop
    from gptlab.training.batches import RandomWindows
    from gptlab.training.speed import match_threads

    match_threads(a.threads)
    train_ids, val_ids, vocab = _char_data()
    train = RandomWindows(train_ids, 64, a.batch, seed=a.seed)
    val = RandomWindows(val_ids, 64, 12, seed=2)  # nanoGPT's measure: 20 batches of 12 x 64
    torch.manual_seed(a.seed)  # the initial weights
    model = build_model(GPT2Config(vocab_size=vocab, context_length=64, emb_dim=128, n_layers=4, n_heads=4,
                                   drop_rate=0.0, mlp_act=a.mlp_act))
    cfg = TrainConfig(max_steps=a.steps, batch_size=a.batch, lr=a.lr, min_lr=a.min_lr, warmup_steps=a.warmup,
                      beta1=a.beta1, beta2=0.99, weight_decay=0.1, grad_clip=1.0, precision=a.precision, compile=a.compile,
                      eval_every=a.eval_every, eval_iters=20, log_every=10**9, device="cpu", target_loss=a.target,
                      flush_denormals=not a.keep_denormals)
    with tempfile.TemporaryDirectory() as run:
        def on_checkpoint():
            rec = json.loads((Path(run) / "metrics.jsonl").read_text().splitlines()[-1])
            _report(rec["step"], rec["val_loss"], t0)

        train_loop(model, train, val, cfg, run, progress=False, echo=lambda m: None, on_checkpoint=on_checkpoint)


def hf_worker(a, t0: float) -> None:
    """The recipe with transformers' GPT2LMHeadModel in a plain loop (nanoGPT's train.py, reduced)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptlab.training.optim import build_optimizer, lr_at
    from gptlab.training.speed import flush_denormals, match_threads

    match_threads(a.threads)
    train_ids, val_ids, vocab = _char_data()
    torch.manual_seed(a.seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=128, n_layer=4, n_head=4,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       activation_function="gelu" if a.mlp_act == "gelu" else "gelu_new",
                                       attn_implementation="sdpa"))
    opt = build_optimizer(model, a.lr, 0.1, (a.beta1, 0.99))
    rng = np.random.default_rng(a.seed)
    offsets = np.arange(65)

    def batch(ids, bs):
        rows = torch.from_numpy(ids[rng.integers(0, len(ids) - 65, size=bs)[:, None] + offsets])
        return rows[:, :-1], rows[:, 1:]

    amp = torch.bfloat16 if a.precision == "bf16" else None
    with flush_denormals("cpu", on=not a.keep_denormals):  # gptlab's CPU default, on both sides
        for step in range(1, a.steps + 1):
            for g in opt.param_groups:
                g["lr"] = lr_at(step - 1, lr=a.lr, warmup_steps=a.warmup, max_steps=a.steps, min_lr=a.min_lr)
            x, y = batch(train_ids, a.batch)
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % a.eval_every == 0 or step == a.steps:
                model.eval()
                with torch.no_grad(), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                    losses = []
                    for _ in range(20):
                        x, y = batch(val_ids, 12)
                        losses.append(float(F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())))
                model.train()
                _report(step, val := sum(losses) / len(losses), t0)
                if val <= a.target:  # as gptlab's target_loss: stop where it is reached
                    break


# nanoGPT's README, "I only have a macbook": the CPU command for this recipe.
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
NANOGPT_EVAL = re.compile(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)")


def check_nanogpt(checkout: Path) -> None:
    """Refuse a folder that is not a nanoGPT checkout (before any side runs)."""
    needed = ("train.py", "config/train_shakespeare_char.py", "data/shakespeare_char/prepare.py")
    missing = [n for n in needed if not (checkout / n).is_file()]
    if missing:
        raise SystemExit(f"--nanogpt-dir {checkout}: not a nanoGPT checkout (no {', '.join(missing)}); "
                         "clone github.com/karpathy/nanoGPT and pass its folder")


def nanogpt_command(checkout: Path, out_dir: str) -> list[str]:
    """nanoGPT's training command, its data prepared from the same text (files in its data folder)."""
    data, text = checkout / "data" / "shakespeare_char", _text().encode("utf-8")
    if not (data / "input.txt").is_file() or (data / "input.txt").read_bytes() != text:
        (data / "input.txt").write_bytes(text)  # prepare.py downloads it only when absent
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, stdout=subprocess.DEVNULL)
    return [sys.executable, "-u", "train.py", *NANOGPT_ARGS, f"--out_dir={out_dir}"]


def _parse_eval(side: str, line: str) -> dict | None:
    if side != "nanogpt":
        return json.loads(line) if line.startswith("{") else None
    m = NANOGPT_EVAL.match(line)
    return {"step": int(m.group(1)), "val_loss": float(m.group(2)), "t": None} if m else None


def run_side(side: str, argv: list[str], target: float, nanogpt_dir: Path | None = None) -> dict:
    """Start one side's process; return when it first reached ``target`` and when it exited (seconds)."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        nano = nanogpt_command(nanogpt_dir, out) if side == "nanogpt" else None  # its data prepared, untimed
        t0 = time.time()
        cmd = nano or [sys.executable, __file__, "--worker", side, "--t0", repr(t0), *argv]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=nanogpt_dir if nano else None)
        return _watch(side, proc, t0, target)


def _watch(side: str, proc: subprocess.Popen, t0: float, target: float) -> dict:
    cpu0 = os.times()
    reached, evals = None, []
    for line in proc.stdout:
        e = _parse_eval(side, line)
        if e is None:
            continue
        e["t"] = e["t"] if e["t"] is not None else time.time() - t0
        evals.append(e)
        if reached is None and e["val_loss"] is not None and e["val_loss"] <= target:
            reached = (e["step"], time.time() - t0)
    proc.wait()
    cpu1 = os.times()
    if proc.returncode:
        raise SystemExit(f"the {side} run failed (exit {proc.returncode})")
    return {"reached": reached, "total": time.time() - t0, "evals": evals,
            "cpu": (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", default="gptlab,hf", help="gptlab, hf, nanogpt (needs --nanogpt-dir); default: %(default)s")
    ap.add_argument("--nanogpt-dir", type=Path, help="a nanoGPT checkout: run its own train.py as a side too")
    ap.add_argument("--nanogpt", action="store_true", help="nanoGPT's recipe on gptlab and hf: lr 1e-3, 2,000 "
                    "steps, 100 warmup steps")
    ap.add_argument("--steps", type=int, help=f"optimizer steps (default: {STEPS}; --nanogpt: 2000)")
    ap.add_argument("--batch", type=int, default=12, help="sequences of 64 characters a step (default: %(default)s)")
    ap.add_argument("--lr", type=float, help="peak learning rate (default: 4e-3; --nanogpt: 1e-3)")
    ap.add_argument("--min-lr", type=float, help="the cosine's floor (default: lr / 10, as nanoGPT)")
    ap.add_argument("--warmup", type=int, help="linear warmup steps (default: 50; --nanogpt: 100)")
    ap.add_argument("--beta1", type=float, help=f"AdamW's beta1 (default: {BETA1}; --nanogpt: 0.9, as nanoGPT)")
    ap.add_argument("--seed", type=int, default=1, help="the initial weights' and the batches' seed (default: %(default)s)")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between evaluations (default: %(default)s, as nanoGPT)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="default: %(default)s")
    ap.add_argument("--threads", type=int, default=0,
                    help="0: the physical cores (2 threads: ~40 ms a step, 1: ~75, on a quiet 2-core CPU; on a "
                         "busy one 1 thread won, as OpenMP threads spin while descheduled)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--keep-denormals", action="store_true",
                    help="keep IEEE denormal floats (default: flushed to zero while training, gptlab's default "
                         "on a CPU, on the gptlab and transformers sides; nanoGPT runs its own code)")
    ap.add_argument("--mlp-act", default="gelu", choices=["gelu", "gelu_tanh"],
                    help="gelu (default): nanoGPT's nn.GELU(), exact; gelu_tanh: GPT-2's tanh approximation")
    ap.add_argument("--target", type=float, default=TARGET, help="the validation loss to reach (default: %(default)s)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.nanogpt and (a.steps, a.lr, a.warmup, a.beta1) != (None, None, None, None):
        raise SystemExit("--nanogpt runs nanoGPT's 2,000 steps at lr 1e-3 after 100 warmup steps, beta1 0.9: drop "
                         "--steps / --lr / --warmup / --beta1, or drop --nanogpt")
    defaults = (2000, 1e-3, 100, 0.9) if a.nanogpt else (STEPS, 4e-3, 50, BETA1)
    a.steps, a.lr, a.warmup, a.beta1 = (v if v is not None else d
                                        for v, d in zip((a.steps, a.lr, a.warmup, a.beta1), defaults))
    a.min_lr = a.lr / 10 if a.min_lr is None else a.min_lr
    for bad, msg in [(not 0 <= a.beta1 < 1, f"--beta1 {a.beta1} must be in [0, 1)"),
                     (not (a.target > 0 and math.isfinite(a.target)), f"--target {a.target} must be a finite loss > 0"),
                     (a.steps < 1 or a.batch < 1 or a.eval_every < 1, "--steps, --batch and --eval-every must be >= 1"),
                     (not 0 < a.lr, f"--lr {a.lr} must be > 0")]:
        if bad:
            raise SystemExit(msg)
    if a.worker:
        (gptlab_worker if a.worker == "gptlab" else hf_worker)(a, a.t0)
        return
    sides = a.sides.split(",")
    if a.nanogpt_dir and "nanogpt" not in sides:
        sides.append("nanogpt")
    for side in sides:
        if side not in ("gptlab", "hf", "nanogpt"):
            raise SystemExit(f"--sides: unknown side {side!r} (choose gptlab, hf, nanogpt)")
    if "nanogpt" in sides:
        if not a.nanogpt_dir:
            raise SystemExit("the nanogpt side needs --nanogpt-dir PATH (a clone of github.com/karpathy/nanoGPT)")
        check_nanogpt(a.nanogpt_dir)
    argv = [f"--steps={a.steps}", f"--batch={a.batch}", f"--lr={a.lr}", f"--min-lr={a.min_lr}",
            f"--warmup={a.warmup}", f"--beta1={a.beta1}", f"--seed={a.seed}", f"--eval-every={a.eval_every}", f"--precision={a.precision}",
            f"--mlp-act={a.mlp_act}", f"--target={a.target}"]
    argv += [f"--threads={a.threads}"]
    argv += ["--compile"] if a.compile else []
    argv += ["--keep-denormals"] if a.keep_denormals else []
    print(f"recipe: {' '.join(argv)}; target val loss {a.target}; load average {os.getloadavg()[0]:.2f}")
    results = {}
    for side in sides:
        r = results[side] = run_side(side, argv, a.target, a.nanogpt_dir)
        curve = ", ".join(f"{e['step']}: {e['val_loss']:.3f} @ {e['t']:.0f}s" for e in r["evals"])
        hit = (f"reached {a.target} at step {r['reached'][0]} after {r['reached'][1]:.1f} s" if r["reached"]
               else f"did NOT reach {a.target}")
        print(f"{side:>7}: {hit}; process {r['total']:.1f} s wall, {r['cpu']:.1f} s CPU; val {curve}")
    nano = results.get("nanogpt")
    if nano and nano["reached"] and results.get("gptlab", {}).get("reached"):
        g = results["gptlab"]
        print(f"gptlab / nanoGPT on this CPU, same run: {g['reached'][1] / nano['reached'][1]:.2f}x the time to "
              f"{a.target} (target <= 0.50x), {g['total'] / nano['total']:.2f}x the process time")
    print(f"nanoGPT reference: 84 s to 1.886, its own code on a quiet 2-core Zen 5 (AVX-512); target <= 42 s. "
          f"This CPU: {_cpu_name()}; load average {os.getloadavg()[0]:.2f}")


def _cpu_name() -> str:
    """The CPU's model name and its widest vector extension (the reference figure's machine had AVX-512)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return f"{name}, {'AVX-512' if ' avx512f' in info else 'AVX2' if ' avx2' in info else 'no AVX2'}"


if __name__ == "__main__":
    main()
