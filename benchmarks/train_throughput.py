"""Training throughput: gptlab GPT-2 vs Hugging Face GPT2LMHeadModel, same config and batch.

Each runs full training steps (forward, backward, AdamW step) at its best
precision on this machine (bf16 autocast where the CPU has native bf16,
fp32 otherwise), with SDPA attention. Prints tokens/s, MFU against the bf16
(or fp32) matmul peak measured here, and the ratio gptlab / HF.

    python benchmarks/train_throughput.py [--steps 8] [--layers 6 --dim 384 --heads 6 --context 256 --batch 8]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from _common import matmul_peak
from gptlab.device import autocast_dtype
from gptlab.models import build_model
from gptlab.models.gpt2 import GPT2Config
from gptlab.training.optim import build_optimizer


def bench(forward, params, batch, steps: int, amp) -> float:
    """tokens/s over `steps` timed training steps (after 2 warm-up steps)."""
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if params is not None else None
    x, y = batch
    ctx = (lambda: torch.autocast("cpu", dtype=amp)) if amp else contextlib.nullcontext
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with ctx():
            logits = forward(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return x.numel() / median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--compile", action="store_true", help="also time gptlab under torch.compile")
    args = ap.parse_args()
    torch.manual_seed(0)
    amp = autocast_dtype(torch.device("cpu"), "auto")
    peak = matmul_peak(amp or torch.float32)
    print(f"threads {torch.get_num_threads()}, precision {amp or torch.float32}, "
          f"measured matmul peak {peak / 1e9:.0f} GFLOP/s")

    cfg = GPT2Config(vocab_size=args.vocab, context_length=args.context, emb_dim=args.dim,
                     n_layers=args.layers, n_heads=args.heads, drop_rate=0.0)
    flops_per_token = 3 * cfg.flops_per_token(args.context)  # forward + backward (2x)
    x = torch.randint(0, args.vocab, (args.batch, args.context))
    y = torch.randint(0, args.vocab, (args.batch, args.context))

    ours = build_model(cfg)
    results = {"gptlab": bench(ours, list(ours.parameters()), (x, y), args.steps, amp)}
    if args.compile:
        compiled = torch.compile(ours)
        results["gptlab+compile"] = bench(compiled, list(ours.parameters()), (x, y), args.steps, amp)

    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

    hf = GPT2LMHeadModel(HFConfig(vocab_size=args.vocab, n_positions=args.context, n_embd=args.dim,
                                  n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0), ).train()
    hf.config._attn_implementation = "sdpa"
    results["hf"] = bench(lambda ids: hf(ids).logits, list(hf.parameters()), (x, y), args.steps, amp)

    print(f"config: L{args.layers} d{args.dim} h{args.heads}, context {args.context}, batch {args.batch}, "
          f"vocab {args.vocab}; {flops_per_token / 1e9:.2f} GFLOP per trained token")
    for name, tps in results.items():
        print(f"{name:>15}: {tps:8,.0f} tokens/s   MFU {100 * tps * flops_per_token / peak:5.1f}%")
    for name in results:
        if name != "hf":
            print(f"ratio {name} / hf: {results[name] / results['hf']:.2f}")


if __name__ == "__main__":
    main()
