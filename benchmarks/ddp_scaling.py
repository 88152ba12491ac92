"""Data-parallel throughput on this machine: 1 process x 2 threads vs 2 processes x 1 thread (gloo).

The same model and the same global batch, trained with gptlab's own pieces (build_model, parallelize,
build_optimizer, the language-modeling loss). For the 2-process run it also measures the communication
share of a step: the step time with gradient synchronisation minus the time of the same step without it
(``no_sync`` / FSDP's ``set_requires_gradient_sync(False)``), over the synchronised step time; and the time
of one bare all-reduce of all gradients. Two cores are not a scaling study: the figures say what the
machinery costs here, not what 8 GPUs do.

    python benchmarks/ddp_scaling.py [--steps 6] [--strategy ddp|fsdp] [--layers 4 --dim 256 --context 128 --batch 8]
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gptlab.models import build_model, get_preset
from gptlab.training import distributed as D
from gptlab.training.loop import LanguageModeling
from gptlab.training.optim import build_optimizer
from gptlab.training.parallel import parallelize


def _model(args):
    cfg = get_preset("gpt2-nano").replace(n_layers=args.layers, emb_dim=args.dim, n_heads=args.heads,
                                          context_length=args.context, vocab_size=args.vocab, drop_rate=0.0)
    torch.manual_seed(0)
    return build_model(cfg)


def _batch(args, rank: int, world: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.context + 1), generator=g)
    part = ids[rank * args.batch // world:(rank + 1) * args.batch // world]
    return part[:, :-1], part[:, 1:]


def _time_steps(par, opt, batch, steps: int, sync: bool) -> float:
    """Median seconds of one optimizer step (2 warm-up steps first)."""
    task, times = LanguageModeling(), []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with par.grad_sync(last=sync):
            task.loss(par.fwd, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        D.barrier(par.dist)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _allreduce_time(model, d: D.Dist, reps: int = 5) -> float:
    n = sum(p.numel() for p in model.parameters())
    buf = torch.zeros(n)
    dist.all_reduce(buf)
    t0 = time.perf_counter()
    for _ in range(reps):
        dist.all_reduce(buf)
    return (time.perf_counter() - t0) / reps


def _worker(rank: int, world: int, port: int, args, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    d = D.setup("cpu")
    model = _model(args)
    par = parallelize(model, d, args.strategy)
    opt = build_optimizer(model, 1e-4)
    batch = _batch(args, rank, world)
    with_sync = _time_steps(par, opt, batch, args.steps, sync=True)
    without = _time_steps(par, opt, batch, args.steps, sync=False) if args.strategy == "ddp" else None
    bare = _allreduce_time(model, d)
    if rank == 0:
        results.update(step=with_sync, nosync=without, allreduce=bare)
    D.teardown(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()
    tokens = args.batch * args.context

    torch.set_num_threads(2)
    model = _model(args)
    par = parallelize(model, D.Dist(), "none")
    t1 = _time_steps(par, build_optimizer(model, 1e-4), _batch(args, 0, 1), args.steps, sync=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n / 1e6:.2f}M parameters, global batch {args.batch} x {args.context} tokens, fp32, "
          f"{os.cpu_count()} CPUs")
    print(f"1 process x 2 threads : {tokens / t1:10,.0f} tok/s  ({t1 * 1e3:.0f} ms/step)")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, port, args, results), nprocs=2, join=True)
        r = dict(results)
    t2 = r["step"]
    print(f"2 processes x 1 thread: {tokens / t2:10,.0f} tok/s  ({t2 * 1e3:.0f} ms/step, {args.strategy}, gloo)"
          f"  -> {t1 / t2:.2f}x the single process")
    if r["nosync"] is not None:
        share = max(0.0, (t2 - r["nosync"]) / t2)
        print(f"communication share of a step: {share:.0%} ({(t2 - r['nosync']) * 1e3:.0f} ms exposed: "
              f"{t2 * 1e3:.0f} ms with gradient sync, {r['nosync'] * 1e3:.0f} ms without)")
    print(f"one all-reduce of all {n / 1e6:.2f}M fp32 gradients ({n * 4 / 2**20:.1f} MiB): "
          f"{r['allreduce'] * 1e3:.0f} ms = {r['allreduce'] / t2:.0%} of a step")


if __name__ == "__main__":
    main()
