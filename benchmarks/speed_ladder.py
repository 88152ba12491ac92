"""The course's training-speed ladder (``gptlab bench ladder``): tokens/s and memory per rung beside the
book's A100 figures, on the current CUDA device, or the rungs that apply on CPU.

    python benchmarks/speed_ladder.py [--device cuda] [--steps 20] [--no-compile]
        [--layers 12 --dim 768 --heads 12 --context 1024 --batch 8 --big-batch 32]
"""

from __future__ import annotations

import argparse

from gptlab.training.ladder import ladder_command


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    for flag in ("steps", "layers", "dim", "heads", "context", "batch", "big-batch"):
        ap.add_argument(f"--{flag}", type=int, default=None)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    a = ap.parse_args()
    raise SystemExit(ladder_command(a.device, a.steps, a.layers, a.dim, a.heads, a.context, a.batch,
                                    a.big_batch, a.compile))


if __name__ == "__main__":
    main()
