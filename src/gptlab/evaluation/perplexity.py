"""Loss and perplexity of a language model on a text.

Perplexity is exp(mean next-token cross-entropy): the effective number of
tokens the model hesitates between at each step (the course's chapter 5).
Windows of ``max_length`` tokens are scored with a ``stride``; with stride <
max_length, only the tokens not already scored by the previous window count,
so every token is predicted once with as much left context as the window allows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gptlab.errors import GptlabError


@torch.no_grad()
def token_losses(model: torch.nn.Module, ids: list[int] | torch.Tensor, max_length: int | None = None,
                 stride: int | None = None, batch_size: int = 8) -> torch.Tensor:
    """Per-token negative log-likelihoods (nats) of ids[1:], each token scored once."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    for name, v in (("max_length", max_length), ("stride", stride), ("batch_size", batch_size)):
        if v is not None and v < 1:
            raise GptlabError(f"{name}={v} must be >= 1")
    L = max_length or model.cfg.context_length
    L = min(L, model.cfg.context_length)
    stride = stride or L
    if stride > L:
        raise GptlabError(f"stride={stride} must not exceed max_length={L}")
    if len(ids) < 2:
        raise GptlabError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    device = next(model.parameters()).device
    model.eval()
    # Window k covers ids[s : s + L + 1]; it scores targets from `prev_end` on.
    spans, prev_end, s = [], 1, 0
    while prev_end < len(ids):
        end = min(s + L + 1, len(ids))
        start = max(0, end - L - 1)
        spans.append((start, end, prev_end))
        prev_end = end
        s += stride
    out = []
    for i in range(0, len(spans), batch_size):
        chunk = spans[i:i + batch_size]
        width = max(e - st for st, e, _ in chunk) - 1
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        y = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, (st, e, first) in enumerate(chunk):
            seg = ids[st:e]
            x[r, :len(seg) - 1] = seg[:-1]
            tgt = seg[1:].clone()
            tgt[: first - st - 1] = -100  # already scored by the previous window
            y[r, :len(seg) - 1] = tgt
        logits = model(x.to(device)).float()
        nll = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), ignore_index=-100, reduction="none")
        keep = y.flatten() != -100
        out.append(nll[keep.to(device)].cpu())
    return torch.cat(out)


def perplexity(model: torch.nn.Module, ids, max_length: int | None = None, stride: int | None = None,
               batch_size: int = 8) -> dict[str, float]:
    """``{"loss", "perplexity", "tokens"}`` of a model on token ids."""
    nll = token_losses(model, ids, max_length, stride, batch_size)
    loss = float(nll.mean())
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(nll.numel())}
