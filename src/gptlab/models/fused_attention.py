"""Causal attention from a packed q/k/v projection in one native call each way (CPU training speed).

GPT-2's attention projects x to q, k, v with one linear layer, splits and
transposes them into heads, runs SDPA and transposes the result back. For the
short contexts of small models on a CPU, SDPA's fixed costs dominate: at context
64, 4 heads of 32, it takes 1.6 ms of a 40 ms training step per layer. The kernels
in ``gpt2_kernels.c`` read the (B, T, 3C) projection as it is and write the
(B, T, C) input of the output projection directly, forward and backward.

:func:`packed_causal_attention` is used by GPT-2 (``attn_impl="sdpa"``) on the CPU
in float32, without a cache or attention dropout, for contexts up to
:data:`MAX_CONTEXT`, where PyTorch's own kernels are AVX2 ones (:func:`preferred`:
against its AVX-512 kernels SDPA is faster); everywhere else SDPA runs. Same results to float rounding
(tests/models/test_fused_attention.py checks both directions against SDPA).
"""

from __future__ import annotations

import functools
import math

import torch

from gptlab.models.gpt2_kernels import compiling as _compiling
from gptlab.models.gpt2_kernels import kernels as _kernels

MAX_CONTEXT = 128  # longer: SDPA's blocked kernel is faster (1.15x at 256 on an AVX2 CPU)


def usable(qkv: torch.Tensor, n_heads: int) -> bool:
    """Whether :func:`packed_causal_attention` takes this (B, T, 3C) projection here: CPU, float32 (no
    autocast), T <= :data:`MAX_CONTEXT`, an AVX2 CPU and a head width of 8, 16, ..., 64."""
    if qkv.device.type != "cpu" or qkv.dtype != torch.float32 or qkv.dim() != 3 or qkv.shape[1] > MAX_CONTEXT \
            or n_heads <= 0 or qkv.shape[-1] % (3 * n_heads) or torch.is_autocast_enabled("cpu") or _compiling():
        return False
    lib = _kernels()
    return lib is not None and bool(lib.gptlab_attention_supports(qkv.shape[-1] // 3 // n_heads))


def preferred(qkv: torch.Tensor, n_heads: int) -> bool:
    """Whether GPT-2's attention takes the kernel: :func:`usable`, on a CPU where PyTorch's own kernels
    run with AVX2. There the kernel won (a 2-core AVX2 EPYC, batch 12, context 64, 4 heads of 32:
    forward 0.35 against 0.53 ms, backward 0.76 against 1.20); where PyTorch runs its AVX-512 kernels,
    its SDPA was faster (a 2-core AVX-512 Xeon: 4.1 against 5.8 ms a layer forward and backward with
    its projections, 9.6 against 11.7 at context 128)."""
    return usable(qkv, n_heads) and torch_cpu_capability() == "AVX2"


@functools.cache
def torch_cpu_capability() -> str:
    """The vector instruction set PyTorch's own CPU kernels run with here (``AVX2``, ``AVX512``, ...)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):  # an older build: say nothing is known
        return "unknown"


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
