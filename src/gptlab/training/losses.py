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


_WORKSPACE: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _workspace(rows: int, w_shape: torch.Size, dtype: torch.dtype, acc: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """The chunk buffers (logits, fp32 log-probabilities, one (Vp, d) gradient term), kept between calls.

    A fresh buffer of this size costs a page fault per 4 KiB on every use (glibc returns blocks over
    32 MiB to the OS on free): reusing them makes the loss ~1.5x faster on CPU. One set is kept (the
    latest shapes): rows x Vp x (2 + 4) bytes plus Vp x d x 2 bytes (~400 MB at 1,280 rows, V=50,304).
    """
    key = (rows, tuple(w_shape), dtype, acc, str(device))
    if key not in _WORKSPACE:
        _WORKSPACE.clear()
        _WORKSPACE[key] = (torch.empty(rows, w_shape[0], dtype=dtype, device=device),
                           torch.empty(rows, w_shape[0], dtype=acc, device=device),
                           torch.empty(w_shape, dtype=dtype, device=device))
    return _WORKSPACE[key]


class _HeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ w.T`` against ``y``, computed ``chunk`` rows at a time (see the module doc)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int, multiple: int,
                dtype: torch.dtype, needs_grad: bool) -> torch.Tensor:
        # h (N, d) in the compute dtype; weight (V, d) the master weight; y (N,) ids, IGNORE_INDEX: no target
        V = weight.shape[0]
        w = weight.detach().to(dtype)  # (V, d): the matmul copy (autocast's cast), kept out of autograd
        if multiple > 1 and V % multiple:
            w = F.pad(w, (0, 0, 0, padded_size(V, multiple) - V))  # (Vp, d), zero rows
        acc = torch.promote_types(dtype, torch.float32)  # fp32 softmax and sums (fp64 stays fp64)
        valid = y != IGNORE_INDEX  # (N,)
        inv_n = 1.0 / valid.sum().to(acc)  # mean over rows with a target (nan when none, like F)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device)
        total = torch.zeros((), dtype=acc, device=h.device)
        logits_buf, logp_buf, gw_buf = _workspace(min(chunk, h.shape[0]), w.shape, dtype, acc, h.device)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                vc = valid[s:s + chunk]
                hc, yc = h[s:s + chunk] * vc[:, None].to(dtype), y[s:s + chunk].clamp_min(0)  # ignored rows: 0
                n = hc.shape[0]
                logits = torch.mm(hc, w.t(), out=logits_buf[:n])  # (n, Vp) in the compute dtype, as the plain head
                if V < w.shape[0]:
                    logits[:, V:] = float("-inf")  # padded rows of the head take no probability
                logp = torch.log_softmax(logits, -1, dtype=acc, out=logp_buf[:n])  # (n, Vp), fp32 like .float()
                total -= (logp.gather(1, yc[:, None]).squeeze(1) * vc).sum()
                if not needs_grad:  # evaluation: the loss only
                    continue
                g = logits.copy_(logp.exp_())  # softmax (n, Vp), back in the compute dtype, over the logits
                g.scatter_add_(1, yc[:, None], torch.full_like(g[:, :1], -1.0))  # - one-hot: d sum-loss / d logits
                grad_h[s:s + chunk] = (g @ w) * (vc * inv_n).to(dtype)[:, None]  # (n, d); 0 on ignored rows
                grad_w += torch.mm(g.t(), hc, out=gw_buf)  # (Vp, d); ignored rows of hc are 0
        ctx.save_for_backward(grad_h, (grad_w[:V] * inv_n).to(weight.dtype))
        return total * inv_n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None, None, None


def chunk_rows_for(vocab: int, elements: int = 2**26) -> int:
    """Rows per chunk so that one chunk's logits hold about ``elements`` values (256 MiB in fp32), >= 64."""
    return max(64, elements // vocab // 64 * 64)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, *, chunk_rows: int | None = None,
                          vocab_multiple: int = 1) -> torch.Tensor:
    """Mean next-token cross-entropy of the head ``weight`` (V, d) on hidden states ``h`` (..., d) vs ``y`` (...).

    Equals ``F.cross_entropy((h @ weight.T).float().flatten(0, -2), y.flatten(), ignore_index=-100)``
    (same dtype of the matmuls: under autocast, its dtype), without the (N, V) logits. Gradients reach
    ``h`` and ``weight`` (in the weight's own dtype: no low-precision copy of the (V, d) gradient).
    """
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    chunk = chunk_rows or chunk_rows_for(padded_size(weight.shape[0], vocab_multiple))
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _HeadCrossEntropy.apply(h.reshape(-1, h.shape[-1]).to(dtype), weight, y.reshape(-1), chunk,
                                   vocab_multiple, dtype, needs_grad)


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
    if _is_sharded(head.weight):  # FSDP: only the model's own forward gathers its weights
        return None
    return head.weight


def _is_sharded(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without torch.distributed
        return False
    return isinstance(t, DTensor)


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
