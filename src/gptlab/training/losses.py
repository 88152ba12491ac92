"""The language-modeling loss without the (B, T, V) logits: the head and the cross-entropy, chunk by chunk.

The plain path ``F.cross_entropy(model(x).float(), y)`` materialises the logits
(B, T, V) in the compute dtype, again in fp32, then their softmax gradient in
fp32: at GPT-2's vocabulary that is 3 x B·T·50,257 floats, the largest tensors
of a small model's step. :func:`chunked_cross_entropy` instead takes the final
hidden states h (B, T, d) and the head's weight (V, d) and walks over
``chunk_rows`` rows of h at a time (default: :func:`chunk_rows_for`, 1,280 rows at V=50,257): logits of the chunk, their fp32 logsumexp,
the loss, and at once the gradient (softmax - one-hot) / n, multiplied straight
into dL/dh and dL/dW (the approach of Liger-Kernel's fused linear
cross-entropy). Only one chunk's logits ever exist; backward just scales the
stored gradients by the incoming one. Same matmuls as the plain path (3 per
token), no recomputation.

``vocab_multiple``: the head's rows are padded with zeros to a multiple of it
(50,257 -> 50,304 for 64: matmul-friendly shapes); the padded logits are set to
-inf before the softmax, so the loss and the gradients are those of the
unpadded head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.models.base import LanguageModel

IGNORE_INDEX = -100


def padded_size(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (1: unchanged)."""
    return -(-n // multiple) * multiple


class _HeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ w.T`` against ``y``, computed ``chunk`` rows at a time (see the module doc)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int, vocab: int) -> torch.Tensor:
        # h (N, d) and w (Vp, d) in the compute dtype; y (N,) ids, IGNORE_INDEX for rows without a target
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 softmax and sums (fp64 stays fp64)
        valid = y != IGNORE_INDEX  # (N,)
        inv_n = 1.0 / valid.sum().to(acc)  # mean over rows with a target (nan when none, like F)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device)
        total = torch.zeros((), dtype=acc, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                hc, yc, vc = h[s:s + chunk], y[s:s + chunk].clamp_min(0), valid[s:s + chunk]
                logits = hc @ w.t()  # (n, Vp) in the compute dtype, as the plain path's head
                if vocab < w.shape[0]:
                    logits[:, vocab:] = float("-inf")  # padded rows of the head take no probability
                logp = torch.log_softmax(logits, dim=-1, dtype=acc)  # (n, Vp), fp32 as the plain path's .float()
                total -= (logp.gather(1, yc[:, None]).squeeze(1) * vc).sum()
                g = logp.exp_()  # softmax, in place of logp
                g.scatter_add_(1, yc[:, None], torch.full_like(g[:, :1], -1.0))  # - one-hot
                g = torch.mul(g, (vc * inv_n)[:, None], out=torch.empty_like(logits))  # d mean / d logits, 0 if ignored
                grad_h[s:s + chunk] = g @ w  # (n, d)
                grad_w += g.t() @ hc  # (Vp, d)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return total * inv_n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(ctx.w_dtype), None, None, None)


def chunk_rows_for(vocab: int, elements: int = 2**26) -> int:
    """Rows per chunk so that one chunk's logits hold about ``elements`` values (256 MiB in fp32), >= 64."""
    return max(64, elements // vocab // 64 * 64)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, *, chunk_rows: int | None = None,
                          vocab_multiple: int = 1) -> torch.Tensor:
    """Mean next-token cross-entropy of the head ``weight`` (V, d) on hidden states ``h`` (..., d) vs ``y`` (...).

    Equals ``F.cross_entropy((h @ weight.T).float().flatten(0, -2), y.flatten(), ignore_index=-100)``
    (same dtype of the matmuls: under autocast, its dtype), without the (N, V) logits. Gradients reach
    ``h`` and ``weight``.
    """
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    vocab = weight.shape[0]
    w = weight.to(dtype)
    if vocab_multiple > 1 and vocab % vocab_multiple:
        w = F.pad(w, (0, 0, 0, padded_size(vocab, vocab_multiple) - vocab))  # (Vp, d), zero rows
    chunk = chunk_rows or chunk_rows_for(w.shape[0])
    return _HeadCrossEntropy.apply(h.reshape(-1, h.shape[-1]).to(dtype), w, y.reshape(-1), chunk, vocab)


def plain_head(model: nn.Module) -> torch.Tensor | None:
    """The weight (V, d) of ``model``'s head when it is a plain bias-free ``nn.Linear`` over the vocabulary
    (so the loss may skip the logits), else None (LoRA-wrapped, quantized, a classifier's head, a toy model).

    ``model`` may be wrapped by ``torch.compile`` (the wrapped module is its ``_orig_mod``).
    """
    base = getattr(model, "_orig_mod", model)
    if not isinstance(base, LanguageModel):
        return None
    head = base.get_head()
    if type(head) is not nn.Linear or head.bias is not None or head.out_features != base.cfg.vocab_size:
        return None
    return head.weight


def lm_cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, chunked: bool = True,
                     chunk_rows: int | None = None, vocab_multiple: int = 1) -> torch.Tensor:
    """Next-token cross-entropy of ``model`` on ids ``x`` (B, T) vs targets ``y`` (B, T) (-100: ignored).

    Through :func:`chunked_cross_entropy` when the model's head allows it (:func:`plain_head`) and
    ``chunked``; otherwise the plain logits path.
    """
    weight = plain_head(model) if chunked else None
    if weight is None:
        logits = model(x)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX)
    return chunked_cross_entropy(model.features(x), weight, y, chunk_rows=chunk_rows, vocab_multiple=vocab_multiple)
