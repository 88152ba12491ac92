"""The course's training-speed ladder, one rung at a time on this machine, beside the book's A100 figures.

Build an LLM From Scratch's training-speed appendix (ch05/10_llm-training-speed) takes chapter 5's
GPT-2 124M from 12,526 to 142,156 tokens/s on one A100, one change at a time. Each rung here keeps
every change above it and adds its own:

    rung                          what changes
    base                          the course's from-scratch model (book/ch04.py), fp32, plain AdamW
    TF32 tensor cores             torch.backends.cuda.matmul.allow_tf32 (CUDA only)
    fused AdamW                   AdamW(fused=True)
    pinned memory                 batches in page-locked memory, copied with non_blocking (CUDA only)
    bf16                          bf16 autocast (gptlab keeps fp32 master weights; the book casts the model)
    PyTorch modules               gptlab's GPT-2 (nn.LayerNorm, F.gelu, nn.Linear), explicit attention
    FlashAttention (SDPA)         F.scaled_dot_product_attention
    torch.compile                 the whole model compiled
    chunked head + loss (gptlab)  no (B, T, V) logits (training/losses.py); compile on the body only
    vocab 50,304                  the head padded to a multiple of 64 in the loss (masked)
    larger batch                  ``big_batch`` sequences a step

tokens/s: on CUDA the wall clock (synchronised); on CPU the process's CPU seconds / threads (on a
shared machine the wall clock measures the queue). Memory: CUDA's peak reserved memory; on CPU the
process's peak RSS (``VmHWM``, reset before each rung).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.device import pick_device
from gptlab.errors import GptlabError
from gptlab.training.losses import lm_cross_entropy
from gptlab.training.speed import compile_model, use_compile_cache


@dataclass(frozen=True)
class Settings:
    """The switches the rungs turn on, cumulatively."""

    tf32: bool = False
    fused: bool = False
    pinned: bool = False
    bf16: bool = False
    native: bool = False
    sdpa: bool = False
    compile: bool = False
    chunked: bool = False
    vocab_multiple: int = 1
    big_batch: bool = False


# (name, the switch it turns on, CUDA only, the book's A100 tokens/s and reserved GB)
RUNGS: tuple[tuple[str, dict, bool, float | None, float | None], ...] = (
    ("Base", {}, False, 12_526, 26.2422),
    ("Use tensor cores", {"tf32": True}, True, 27_648, 26.2422),
    ("Fused AdamW optimizer", {"fused": True}, False, 28_399, 26.2422),
    ("Pinned memory in the data loader", {"pinned": True}, True, 28_402, 26.2422),
    ("Using bfloat16 precision", {"bf16": True}, False, 45_486, 13.7871),
    ("Replacing from-scratch code by PyTorch classes", {"native": True}, False, 55_256, 11.5645),
    ("Using FlashAttention", {"sdpa": True}, False, 91_901, 5.9004),
    ("Using pytorch.compile", {"compile": True}, False, 112_046, 6.1875),
    ("Chunked head + cross-entropy (gptlab)", {"chunked": True}, False, None, None),
    ("Vocab padded to 50,304", {"vocab_multiple": 64}, False, 127_345, 5.8906),
    ("Larger batch", {"big_batch": True}, False, 142_156, 22.5078),
)


@dataclass
class Shape:
    """The model and batch the ladder trains (the book's: GPT-2 124M, context 1024, batch 8)."""

    layers: int = 12
    dim: int = 768
    heads: int = 12
    context: int = 1024
    batch: int = 8
    big_batch: int = 32
    vocab: int = 50257


def build(s: Settings, shape: Shape, device: torch.device) -> nn.Module:
    """The rung's model on ``device``: the course's from-scratch GPT, or gptlab's GPT-2 (math or SDPA attention)."""
    torch.manual_seed(0)
    if not s.native:
        from gptlab.book.ch04 import GPTModel

        return GPTModel({"vocab_size": shape.vocab, "context_length": shape.context, "emb_dim": shape.dim,
                         "n_heads": shape.heads, "n_layers": shape.layers, "drop_rate": 0.0,
                         "qkv_bias": False}).to(device)
    from gptlab.models import build_model
    from gptlab.models.gpt2 import GPT2Config

    cfg = GPT2Config(vocab_size=shape.vocab, context_length=shape.context, emb_dim=shape.dim,
                     n_layers=shape.layers, n_heads=shape.heads, drop_rate=0.0, qkv_bias=False,
                     attn_impl="sdpa" if s.sdpa else "math")
    return build_model(cfg).to(device)


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS


def _peak_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return None


def _clock(device: torch.device):
    if device.type == "cuda":
        def wall() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return wall
    return lambda: time.process_time() / torch.get_num_threads()


def run_rung(s: Settings, shape: Shape, device: torch.device, steps: int, warmup: int = 2) -> tuple[float, float | None]:
    """(tokens/s, peak memory GB) of ``steps`` training steps with settings ``s`` after ``warmup`` steps."""
    _reset_memory(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = s.tf32
    model = build(s, shape, device)
    if s.compile:
        use_compile_cache()
        fwd = compile_model(model) if s.chunked else torch.compile(model)
    else:
        fwd = model
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1, fused=s.fused)
    B, T = (shape.big_batch if s.big_batch else shape.batch), shape.context
    data = torch.randint(0, shape.vocab, (warmup + steps, B, T + 1))
    if s.pinned:
        data = data.pin_memory()
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if s.bf16 else contextlib.nullcontext
    clock, t0 = _clock(device), None
    for i in range(warmup + steps):
        if i == warmup:
            t0 = clock()
        rows = data[i].to(device, non_blocking=s.pinned)
        x, y = rows[:, :-1], rows[:, 1:]
        with amp():
            if s.chunked:
                loss = lm_cross_entropy(fwd, x, y, vocab_multiple=s.vocab_multiple)
            else:
                loss = F.cross_entropy(fwd(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = clock() - t0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return B * T * steps / seconds, _peak_gb(device)


def run_ladder(shape: Shape, device: torch.device, steps: int, compile: bool = True, echo=print) -> list[dict]:
    """Every rung in order; prints the table as it goes and returns its rows."""
    s, rows = Settings(), []
    mem = "Reserved memory GB" if device.type == "cuda" else "Peak RSS GB"
    echo(f"{'':<48} {'Avg tok/sec':>12} {mem:>19}   {'book A100 tok/sec':>17} {'book GB':>8}")
    for name, change, cuda_only, book_tps, book_gb in RUNGS:
        book = f"{book_tps:>17,.0f} {book_gb:>8.4f}" if book_tps else f"{'—':>17} {'—':>8}"
        skip = ("CUDA only" if cuda_only and device.type != "cuda"
                else "compile off (--no-compile)" if change.get("compile") and not compile else None)
        if skip:  # the rung's change is not kept: the rungs below run without it
            echo(f"{name:<48} {'(' + skip + ')':>32}   {book}")
            rows.append({"rung": name, "tokens_per_s": None, "memory_gb": None, "skipped": skip})
            continue
        s = replace(s, **change)
        tps, gb = run_rung(s, shape, device, steps, warmup=3 if s.compile else 2)
        gb_text = f"{gb:.4f}" if gb is not None else "—"
        echo(f"{name:<48} {tps:>12,.0f} {gb_text:>19}   {book}")
        rows.append({"rung": name, "tokens_per_s": tps, "memory_gb": gb, "skipped": None})
    return rows


def ladder_command(device: str = "auto", steps: int | None = None, layers: int | None = None,
                   dim: int | None = None, heads: int | None = None, context: int | None = None,
                   batch: int | None = None, big_batch: int | None = None, compile: bool = True) -> int:
    """Run the course's training-speed ladder (base, TF32, fused AdamW, pinned memory, bf16, PyTorch
    modules, FlashAttention, torch.compile, chunked loss, vocab 50,304, larger batch) and print tokens/s
    and memory per rung beside the book's A100 figures.

    Args:
        device: auto, cpu, cuda or cuda:N. On CPU the CUDA-only rungs are listed as such.
        steps: timed steps per rung (default: 20 on CUDA, 3 on CPU).
        layers: transformer blocks (default: the book's GPT-2 124M on CUDA, 6 on CPU).
        dim: model width (default 768 on CUDA, 384 on CPU).
        heads: attention heads (default 12 on CUDA, 6 on CPU).
        context: tokens per sequence (default 1024 on CUDA, 256 on CPU).
        batch: sequences per step (default 8).
        big_batch: sequences per step on the last rung (default 32 on CUDA, 16 on CPU).
        compile: run the torch.compile rungs (on CPU compiling takes minutes on a busy machine).
    """
    dev = pick_device(device)
    if dev.type not in ("cuda", "cpu"):
        raise GptlabError(f"the ladder runs on CUDA or CPU, not {dev.type}; pass --device cpu")
    cpu = dev.type == "cpu"
    shape = Shape(layers=layers or (6 if cpu else 12), dim=dim or (384 if cpu else 768),
                  heads=heads or (6 if cpu else 12), context=context or (256 if cpu else 1024),
                  batch=batch or 8, big_batch=big_batch or (16 if cpu else 32))
    for name in ("steps", "layers", "dim", "heads", "context", "batch", "big_batch"):
        value = locals()[name]
        if value is not None and value < 1:
            raise GptlabError(f"--{name.replace('_', '-')} {value} must be >= 1")
    where = torch.cuda.get_device_name(dev) if not cpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"speed ladder on {where}: GPT-2 L{shape.layers} d{shape.dim} h{shape.heads}, context {shape.context}, "
          f"batch {shape.batch} (larger: {shape.big_batch}), vocab {shape.vocab}; load average "
          f"{os.getloadavg()[0]:.2f}")
    run_ladder(shape, dev, steps or (3 if cpu else 20), compile=compile)
    return 0
