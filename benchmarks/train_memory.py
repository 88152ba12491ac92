"""Peak training memory vs context: peak RSS of one training step at contexts 256 .. 2048, with and without
activation checkpointing (the throughput config: GPT-2 L6/d384/h6, batch 8, vocab 50,257, bf16 autocast
where fast, the chunked loss). Each point runs in a fresh process (peak RSS only grows in a process).

Activation checkpointing recomputes each block in backward (``torch.utils.checkpoint``, applied from
outside the model through ``LanguageModel.get_blocks()``); ``--loss plain`` measures the logits path.

    python benchmarks/train_memory.py [--contexts 256,512,1024,2048] [--batch 8] [--loss chunked|plain]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def checkpoint_blocks(model) -> None:
    """Recompute each block's activations in backward (the training/parallel.py helper where it exists)."""
    try:
        from gptlab.training.parallel import checkpoint_blocks as shared
    except ImportError:
        shared = None
    if shared is not None:
        shared(model)
        return
    from torch.utils.checkpoint import checkpoint

    for block in model.get_blocks():
        block.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(block.forward)


def worker(context: int, batch: int, ckpt: bool, loss_kind: str) -> None:
    import torch
    import torch.nn.functional as F

    from gptlab.device import autocast_dtype
    from gptlab.models import build_model
    from gptlab.models.gpt2 import GPT2Config
    from gptlab.training.losses import lm_cross_entropy

    torch.manual_seed(0)
    model = build_model(GPT2Config(vocab_size=50257, context_length=context, emb_dim=384, n_layers=6, n_heads=6,
                                   drop_rate=0.0))
    if ckpt:
        checkpoint_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    amp = autocast_dtype(torch.device("cpu"), "auto")
    x = torch.randint(0, 50257, (batch, context))
    before = peak_rss_mb()
    for _ in range(2):
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            if loss_kind == "plain":
                loss = F.cross_entropy(model(x).flatten(0, 1).float(), x.flatten())
            else:
                loss = lm_cross_entropy(model, x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(json.dumps({"before": before, "peak": peak_rss_mb()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="256,512,1024,2048")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--loss", default="chunked", choices=["chunked", "plain"])
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(int(a.worker[0]), a.batch, a.worker[1] == "1", a.loss)
        return
    print(f"GPT-2 L6/d384/h6, batch {a.batch}, vocab 50257, {a.loss} loss; peak RSS of 2 training steps "
          f"(MB); load average {os.getloadavg()[0]:.2f}")
    print(f"{'context':>8} {'no checkpointing':>17} {'checkpointing':>14}   (model + optimizer + imports before "
          "the first step: ~)")
    for ctx in map(int, a.contexts.split(",")):
        cells = []
        for ckpt in ("0", "1"):
            out = subprocess.run([sys.executable, __file__, "--worker", str(ctx), ckpt, f"--batch={a.batch}",
                                  f"--loss={a.loss}"], capture_output=True, text=True, check=True).stdout
            cells.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{ctx:>8} {cells[0]['peak']:>17,.0f} {cells[1]['peak']:>14,.0f}   ({cells[0]['before']:,.0f})")


if __name__ == "__main__":
    main()
