"""torch.compile start-up, first and second run: the seconds to the first compiled training step in a
fresh process, with inductor's on-disk cache empty (first run) and filled by it (second run).

The model is the throughput config (GPT-2 L6/d384/h6, context 256, batch 8, vocab 50,257), compiled
as the training loop compiles it (``gptlab.training.speed.compile_model``: the body compiled, the
chunked loss eager), bf16 autocast where the CPU has it. The cache lives in a temporary
``GPTLAB_CACHE`` so the figures do not depend on earlier runs.

    python benchmarks/compile_cache.py [--layers 6 --dim 384 --context 256 --batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def worker(a) -> None:
    t_start = time.perf_counter()
    import torch

    from gptlab.device import autocast_dtype
    from gptlab.models import build_model
    from gptlab.models.gpt2 import GPT2Config
    from gptlab.training.losses import lm_cross_entropy
    from gptlab.training.speed import compile_model

    t_import = time.perf_counter()
    model = build_model(GPT2Config(vocab_size=50257, context_length=a.context, emb_dim=a.dim, n_layers=a.layers,
                                   n_heads=a.dim // 64, drop_rate=0.0))
    fwd = compile_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    amp = autocast_dtype(torch.device("cpu"), "auto")
    x = torch.randint(0, 50257, (a.batch, a.context))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = lm_cross_entropy(fwd, x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"import": t_import - t_start, "first_step": times[0], "step": min(times[1:])}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    print(f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "GPTLAB_CACHE": cache}
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
        for run in ("first (empty cache)", "second (cached)"):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--worker", f"--layers={a.layers}", f"--dim={a.dim}",
                                  f"--context={a.context}", f"--batch={a.batch}"], env=env, check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{run:>20}: first compiled step {r['first_step']:6.1f} s (compiling), a later step "
                  f"{r['step']:5.2f} s; whole process {time.perf_counter() - t0:6.1f} s")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
