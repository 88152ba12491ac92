"""Weight-only int8 quantization for fast decoding on CPU (and wherever the kernel exists).

Decoding one token reads every weight once, so its speed is set by how many
bytes the weights take: fp32 reads 4 bytes per weight, int8 reads 1. Each
output row ``o`` of a linear layer keeps a scale ``s_o = max_i |W[o, i]| / 127``
and int8 values ``q = round(W / s_o)``; the layer computes
``y = (x @ qᵀ) · s`` with PyTorch's fused int8-weight kernel
(``aten._weight_int8pack_mm``, bf16 activations), or by dequantizing on the fly
where that kernel is missing. The error per weight is at most ``s_o / 2``.

Applied from outside the model, like ``torch.compile``:

    model = gptlab.load_model(ref)
    quantize_int8(model)        # every nn.Linear -> Int8Linear, in place
"""

from __future__ import annotations

import torch
import torch.nn as nn

_KERNEL_OK: dict[str, bool] = {}


def _kernel_works(device: torch.device) -> bool:
    """Whether aten._weight_int8pack_mm runs on this device type (checked once)."""
    key = device.type
    if key not in _KERNEL_OK:
        try:
            x = torch.ones(1, 32, dtype=torch.bfloat16, device=device)
            w = torch.ones(8, 32, dtype=torch.int8, device=device)
            s = torch.ones(8, dtype=torch.bfloat16, device=device)
            y = torch.ops.aten._weight_int8pack_mm(x, w, s)
            _KERNEL_OK[key] = bool(torch.allclose(y.float(), torch.full((1, 8), 32.0, device=device)))
        except (RuntimeError, NotImplementedError, AttributeError):
            _KERNEL_OK[key] = False
    return _KERNEL_OK[key]


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one bf16 scale per output feature."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        amax = w.abs().amax(dim=1).clamp(min=1e-12)  # (out,)
        # The kernel takes bf16 scales: quantize with the rounded scale, rounded up so
        # that the largest weight still fits in [-127, 127].
        scale = (amax / 127.0).to(torch.bfloat16)
        scale = torch.where(scale.float() * 127.0 < amax, torch.nextafter(scale, scale.new_tensor(float("inf"))), scale)
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        """The float weight this layer computes with, (out, in) fp32."""
        return self.weight_int8.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (N, in)
        if _kernel_works(x.device):
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scale)  # (N, out)
        else:
            y = x2 @ (self.weight_int8.to(torch.bfloat16) * self.scale[:, None]).t()
        y = y.to(x.dtype).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by :class:`Int8Linear`; returns the model.

    ``skip`` lists module-name suffixes to leave in float (e.g. ``("lm_head",)``).
    A tied output head becomes an int8 copy; the embedding it was tied to stays float.
    For inference only: the int8 weights do not train.
    """
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not any(name.endswith(s) for s in skip)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(mod).to(mod.weight.device))
    return model.eval()


def apply_quantization(model: nn.Module, scheme: str) -> nn.Module:
    """Apply a named scheme (``"int8"``) to a loaded model; a clear error for anything else."""
    from gptlab.errors import GptlabError

    if scheme == "int8":
        return quantize_int8(model)
    raise GptlabError(f"unknown quantization {scheme!r}; the supported scheme is int8 (weight-only)")
