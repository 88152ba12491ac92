"""GPT-2's tanh GELU in one native pass each way (CPU training speed).

``F.gelu`` with the tanh approximation takes 1.5-1.6 ms forward + backward per
(768 x 512) values on a CPU (PyTorch's vector tanh is slow: an AVX2 EPYC and an
AVX-512 Xeon alike); the kernel in ``gpt2_kernels.c`` computes Φ(x) and Φ'(x) from
one exponential per value, forward and backward: 0.6-0.8 ms. The exact (erf) GELU
is PyTorch's own: 0.56-0.65 ms there, which a native erf form did not beat.

:func:`gelu` is what GPT-2's MLP calls: the native kernel for the tanh form on the
CPU in float32 (no autocast, not inside torch.compile, an AVX2 CPU); ``F.gelu``
everywhere else. Same results to float rounding (tests/models/test_fused_gelu.py
checks both directions against a float64 reference and against ``F.gelu``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptlab.models.gpt2_kernels import compiling, kernels

FORMS = ("none", "tanh")  # F.gelu's ``approximate``; the kernel computes "tanh"


def usable(x: torch.Tensor) -> bool:
    """Whether the native GELU takes ``x`` here: CPU, float32 (no autocast), an AVX2 CPU, not compiling."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu") or compiling():
        return False
    lib = kernels()
    return lib is not None and bool(lib.gptlab_gelu_supported())


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        if x.numel():
            kernels().gptlab_gelu_forward(x.numel(), x.data_ptr(), y.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(x)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises instead of coming out zero
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        if x.numel():
            kernels().gptlab_gelu_backward(x.numel(), x.data_ptr(), dy.data_ptr(), dx.data_ptr(),
                                           torch.get_num_threads())
        return dx


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(x, approximate=...)``; the tanh form natively where :func:`usable` (x)."""
    if approximate not in FORMS:
        raise ValueError(f"approximate={approximate!r} must be one of {', '.join(map(repr, FORMS))}")
    if approximate != "tanh" or not usable(x):
        return F.gelu(x, approximate=approximate)
    return _Gelu.apply(x)
