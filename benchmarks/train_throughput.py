"""Training throughput: gptlab GPT-2 vs Hugging Face GPT2LMHeadModel, same config and batch, same run.

Each side runs full training steps (forward, loss, backward, fused AdamW step) at its best settings on
this machine: bf16 autocast where the CPU has native bf16 (AMX / AVX512-BF16), SDPA attention. gptlab
is timed with the plain logits loss and with the chunked head + cross-entropy (training/losses.py),
also with the head padded to a multiple of 64; ``--compile`` adds torch.compile'd variants of both.
Prints tokens/s, MFU against the bf16 matmul peak measured in the same run, the ratio to transformers,
and a per-part breakdown of a step (data, forward, loss, backward, optimizer, host sync) for each.

    python benchmarks/train_throughput.py [--steps 3] [--threads N] [--compile]
        [--layers 6 --dim 384 --heads 6 --context 256 --batch 8 --vocab 50257]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
import torch.nn.functional as F

from _common import cpu_clock, matmul_peak
from gptlab.device import autocast_dtype
from gptlab.models import build_model
from gptlab.models.gpt2 import GPT2Config
from gptlab.training.batches import window_batches
from gptlab.training.losses import chunked_cross_entropy
from gptlab.training.optim import build_optimizer
from gptlab.training.speed import CompiledModel, match_threads, use_compile_cache

PARTS = ("data", "forward", "loss", "backward", "optimizer", "sync")


def bench(features, loss_of, params, train, steps: int, amp, clock=cpu_clock) -> tuple[float, dict[str, float]]:
    """(tokens/s, median seconds per part) over ``steps`` timed steps after 2 warm-up steps, timed by ``clock``.

    ``features(x) -> h`` is the forward the part "forward" times, ``loss_of(h, y) -> loss`` the part "loss".
    """
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ctx = (lambda: torch.autocast("cpu", dtype=amp)) if amp else contextlib.nullcontext
    rows = []
    for i in range(steps + 2):
        t = [clock()]
        x, y = train.batch(i)
        t.append(clock())
        with ctx():
            h = features(x)
            t.append(clock())
            loss = loss_of(h, y)
            t.append(clock())
        loss.backward()
        t.append(clock())
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(clock())
        float(loss.detach())  # the host sync of a logged step (free on CPU, a pipeline stall on CUDA)
        t.append(clock())
        if i >= 2:
            rows.append([b - a for a, b in zip(t, t[1:])])
    med = {p: sorted(r[k] for r in rows)[len(rows) // 2] for k, p in enumerate(PARTS)}
    total = sorted(sum(r) for r in rows)[len(rows) // 2]
    return train.bs * train.tokens_per_item / total, med


def plain_loss(head):
    return lambda h, y: F.cross_entropy(head(h).flatten(0, 1).float(), y.flatten())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--compile", action="store_true", help="also time both under torch.compile")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    threads = match_threads(args.threads)
    torch.manual_seed(0)
    amp = autocast_dtype(torch.device("cpu"), "auto")
    peak_wall = matmul_peak(amp or torch.float32, seconds=1.0)
    peak = matmul_peak(amp or torch.float32, seconds=1.0, clock=cpu_clock)
    print(f"threads {threads}, precision {amp or torch.float32}, measured matmul peak {peak / 1e9:.0f} GFLOP/s "
          f"(CPU-time clock; wall clock {peak_wall / 1e9:.0f}), load average {os.getloadavg()[0]:.2f}")
    print("all figures are timed by the CPU-time clock (process CPU seconds / threads): on a busy machine the "
          "wall clock measures the queue, not the code")

    cfg = GPT2Config(vocab_size=args.vocab, context_length=args.context, emb_dim=args.dim,
                     n_layers=args.layers, n_heads=args.heads, drop_rate=0.0)
    flops_per_token = 3 * cfg.flops_per_token(args.context)  # forward + backward (2x)
    tokens = torch.randint(0, args.vocab, (args.batch * (args.steps + 2) * (args.context + 1),))
    train = window_batches(tokens, args.context, args.context, args.batch, shuffle=False)

    ours = build_model(cfg)
    head = ours.get_head()
    params = list(ours.parameters())
    results = {
        "gptlab plain": bench(ours.features, plain_loss(head), params, train, args.steps, amp),
        "gptlab chunked": bench(ours.features, lambda h, y: chunked_cross_entropy(h, head.weight, y),
                                params, train, args.steps, amp),
        "gptlab chunked pad64": bench(ours.features, lambda h, y: chunked_cross_entropy(
            h, head.weight, y, vocab_multiple=64), params, train, args.steps, amp),
    }
    if args.compile:
        use_compile_cache()
        t0 = time.perf_counter()
        comp = CompiledModel(ours)
        results["gptlab chunked+compile"] = bench(comp.features, lambda h, y: chunked_cross_entropy(
            h, head.weight, y), params, train, args.steps, amp)
        print(f"gptlab compile + {args.steps + 2} steps: {time.perf_counter() - t0:.1f} s")
    if not args.skip_hf:
        from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

        hf = GPT2LMHeadModel(HFConfig(vocab_size=args.vocab, n_positions=args.context, n_embd=args.dim,
                                      n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, attn_implementation="sdpa")).train()
        hf_params = list(hf.parameters())
        results["hf sdpa"] = bench(lambda ids: hf(ids).logits, lambda lg, y: F.cross_entropy(
            lg.flatten(0, 1).float(), y.flatten()), hf_params, train, args.steps, amp)
        if args.compile:
            t0 = time.perf_counter()
            hf_c = torch.compile(hf)
            results["hf sdpa+compile"] = bench(lambda ids: hf_c(ids).logits, lambda lg, y: F.cross_entropy(
                lg.flatten(0, 1).float(), y.flatten()), hf_params, train, args.steps, amp)
            print(f"hf compile + {args.steps + 2} steps: {time.perf_counter() - t0:.1f} s")

    print(f"config: L{args.layers} d{args.dim} h{args.heads}, context {args.context}, batch {args.batch}, "
          f"vocab {args.vocab}; {flops_per_token / 1e9:.2f} GFLOP per trained token")
    print(f"{'':>24} {'tokens/s':>9} {'MFU':>6}  " + " ".join(f"{p:>9}" for p in PARTS) + "   (ms, median)")
    for name, (tps, parts) in results.items():
        print(f"{name:>24} {tps:9,.0f} {100 * tps * flops_per_token / peak:5.1f}%  "
              + " ".join(f"{1000 * parts[p]:9.1f}" for p in PARTS))
    hf_best = max((v[0] for k, v in results.items() if k.startswith("hf")), default=None)
    if hf_best:
        best = max((v[0], k) for k, v in results.items() if k.startswith("gptlab"))
        print(f"best gptlab ({best[1]}) / best transformers: {best[0] / hf_best:.2f}x "
              f"(target >= 1.6x); MFU {100 * best[0] * flops_per_token / peak:.1f}% (target >= 45%)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
