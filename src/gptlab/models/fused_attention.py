"""Causal attention from a packed q/k/v projection in one native call each way (CPU training speed).

GPT-2's attention projects x to q, k, v with one linear layer, splits and
transposes them into heads, runs SDPA and transposes the result back. For the
short contexts of small models on a CPU, SDPA's fixed costs dominate: at context
64, 4 heads of 32, it takes ~2.3 ms of a ~45 ms training step per layer. The kernels
in ``gpt2_kernels.c`` read the (B, T, 3C) projection as it is and write the
(B, T, C) input of the output projection directly, forward and backward, each
(batch, head) as small register-blocked matrix products: 1.3-1.9x SDPA's speed.

:func:`packed_causal_attention` is used by GPT-2 (``attn_impl="sdpa"``) on the CPU
in float32, without a cache or attention dropout, for contexts up to
:data:`MAX_CONTEXT` (:func:`preferred`); everywhere else SDPA runs. Same results to float rounding
(tests/models/test_fused_attention.py checks both directions against SDPA, with the AVX-512 and the
AVX2 builds of the kernel).
"""

from __future__ import annotations

import math

import torch

from gptlab.models.gpt2_kernels import compiling as _compiling
from gptlab.models.gpt2_kernels import kernels as _kernels

MAX_CONTEXT = 512  # each thread keeps a task's (T, T) probabilities and their gradient: 2 MB at 512


def usable(qkv: torch.Tensor, n_heads: int) -> bool:
    """Whether :func:`packed_causal_attention` takes this (B, T, 3C) projection here: CPU, float32 (no
    autocast), T <= :data:`MAX_CONTEXT`, an AVX2 CPU (x86-64 with a C compiler) and a head width of 8,
    16, ..., 64."""
    if qkv.device.type != "cpu" or qkv.dtype != torch.float32 or qkv.dim() != 3 or qkv.shape[1] > MAX_CONTEXT \
            or n_heads <= 0 or qkv.shape[-1] % (3 * n_heads) or torch.is_autocast_enabled("cpu") or _compiling():
        return False
    lib = _kernels()
    return lib is not None and bool(lib.gptlab_attention_supports(qkv.shape[-1] // 3 // n_heads))


def preferred(qkv: torch.Tensor, n_heads: int) -> bool:
    """Whether GPT-2's attention takes the kernel: wherever it is :func:`usable`. Its vectors are the
    build's own (AVX-512 where the compiler targets it, else AVX2), as wide as PyTorch's kernels on the
    same CPU. On a 2-core AVX-512 Xeon, forward + backward against SDPA with its split/transpose copies:
    1.34 against 2.27 ms at batch 12, context 64, 4 heads of 32 (the Shakespeare model's layer), 6.2
    against 10.1 at 8 x 128, 6 heads of 64, 13.7 against 25.6 at 8 x 256, 35.5 against 45.3 at 4 x 512."""
    return usable(qkv, n_heads)


def _check(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"the native causal attention {what} failed (code {rc}: "
                           f"{'head width not supported' if rc == 1 else 'out of memory'})")


class _PackedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
        qkv = qkv.contiguous()
        B, T, C3 = qkv.shape
        C = C3 // 3
        D = C // n_heads
        out = torch.empty(B, T, C, dtype=qkv.dtype)
        lse = torch.empty(B, n_heads, T, dtype=qkv.dtype)
        ctx.n_heads, ctx.scale = n_heads, 1.0 / math.sqrt(D)
        if B * T:  # an empty batch: nothing to compute
            _check(_kernels().gptlab_causal_attention_forward(B, T, n_heads, D, qkv.data_ptr(), out.data_ptr(),
                                                              lse.data_ptr(), ctx.scale, torch.get_num_threads()),
                   "forward")
        ctx.save_for_backward(qkv, out, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises instead of coming out zero
    def backward(ctx, grad_out: torch.Tensor):
        qkv, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        B, T, C3 = qkv.shape
        dqkv = torch.empty_like(qkv)
        if dqkv.numel() == 0:
            return dqkv, None
        _check(_kernels().gptlab_causal_attention_backward(B, T, ctx.n_heads, C3 // 3 // ctx.n_heads, qkv.data_ptr(),
                                                           out.data_ptr(), grad_out.data_ptr(), lse.data_ptr(),
                                                           dqkv.data_ptr(), ctx.scale, torch.get_num_threads()),
               "backward")
        return dqkv, None


def packed_causal_attention(qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """softmax(q kᵀ / √D, causal) v for each head of a (B, T, 3C) q/k/v projection -> (B, T, C), heads side
    by side (the output projection's input). Differentiable; needs :func:`usable` (qkv, n_heads)."""
    if not usable(qkv, n_heads):
        raise ValueError(f"the native causal attention does not take this input ({tuple(qkv.shape)} "
                         f"{qkv.dtype} on {qkv.device}, {n_heads} heads): use SDPA")
    return _PackedCausalAttention.apply(qkv, n_heads)
