"""Optimizer and learning-rate schedule.

AdamW (Loshchilov & Hutter 2019) with weight decay on 2-D weights only
(matmul weights and embeddings; never biases or norm gains), fused kernels
where the device has them. The schedule is linear warmup then cosine decay to
a floor (``min_lr``), as the course's chapter 5 appendix teaches.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters: decay for dim >= 2, none for biases and norms."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; fused on CUDA/MPS/CPU when this torch supports it."""
    groups = param_groups(model, weight_decay)
    if not any(g["params"] for g in groups):
        from gptlab.errors import GptlabError

        raise GptlabError("no trainable parameters: check the freezing policy")
    kwargs = {}
    device = next(model.parameters()).device
    if "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "mps", "cpu"):
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, cosine to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if max_steps <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
