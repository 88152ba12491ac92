"""Weight-only int8 and int4 quantization for fast decoding on CPU (and wherever the kernels exist).

Decoding one token reads every weight once, so its speed is set by how many
bytes the weights take: fp32 reads 4 bytes per weight, int8 reads 1, int4
reads half a byte.

int8 (:class:`Int8Linear`). Each
output row ``o`` of a linear layer keeps a scale ``s_o = max_i |W[o, i]| / 127``
and int8 values ``q = round(W / s_o)``; the layer computes
``y = (x @ qᵀ) · s`` with PyTorch's fused int8-weight kernel
(``aten._weight_int8pack_mm``, bf16 activations), or by dequantizing on the fly
where that kernel is missing. The error per weight is at most ``s_o / 2``.

int4 (:class:`Int4Linear`). Each group of ``group_size`` (32) consecutive
inputs of an output row keeps its own scale ``d`` and minimum ``m``, and 4-bit
codes ``c = round((W - m) / d)`` in 0..15: ``W ≈ m + d·c``. That is exactly
GGUF's Q4_1 block, so a Q4_1 file's weights survive the trip unchanged (up to
the scales' rounding to bf16). The layer computes with PyTorch's packed 4-bit
CPU kernel (``aten._weight_int4pack_mm_for_cpu``, bf16 activations), which
stores ``zero = m + 8·d`` and computes ``(c - 8)·d + zero``; elsewhere it
dequantizes on the fly. The output head stays int8 under ``"int4"`` (as
llama.cpp keeps its output tensor at 6-8 bits): 4-bit logits cost more
quality than they save time.

Applied from outside the model, like ``torch.compile``:

    model = gptlab.load_model(ref)
    quantize_int8(model)        # every nn.Linear -> Int8Linear, in place
    quantize_int4(model)        # or: 4-bit blocks, output head int8
"""

from __future__ import annotations

import torch
import torch.nn as nn

import gptlab.inference.native as native
from gptlab.models.base import LanguageModel

_KERNEL_OK: dict[str, bool] = {}
_ROWS = 4096  # output rows quantized at a time


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


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float rows (rows, in) -> int8 values and one bf16 scale per row, ``w ≈ q · s``."""
    w = w.float()
    amax = w.abs().amax(dim=1).clamp(min=1e-12)  # (rows,)
    # The kernel takes bf16 scales: quantize with the rounded scale, rounded up so
    # that the largest weight still fits in [-127, 127].
    s = (amax / 127.0).to(torch.bfloat16)
    s = torch.where(s.float() * 127.0 < amax, torch.nextafter(s, s.new_tensor(float("inf"))), s)
    return torch.round(w / s.float()[:, None]).clamp(-127, 127).to(torch.int8), s


class Int8Embedding(nn.Module):
    """A token embedding read from int8 rows with one scale each (shared with a tied int8 head).

    Looking up T ids dequantizes T rows only, so the table costs 1 byte per weight.
    """

    def __init__(self, head: "Int8Linear", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("weight_int8", head.weight_int8)  # the head's own tensors, not copies
        self.register_buffer("scale", head.scale)
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = head.weight_int8.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.weight_int8[ids].to(self.dtype) * self.scale[ids].to(self.dtype).unsqueeze(-1))  # (B, T, d)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows (shared with the head)"


def _without_native_pack(state: dict) -> dict:
    """A layer's pickled state without the native kernels' packed copy (``native.packed_int4``/``packed_int8``:
    remade on first use)."""
    return {k: v for k, v in state.items() if k != "_native_pack"}


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one bf16 scale per output feature.

    ``rounds_activations`` (set by :func:`quantize_int4` on its int8 head): the native kernel may round
    x to int8 per 32-group, as the int4 layers do theirs (see ``native.i8_matmul``).
    """

    rounds_activations: bool = False

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()  # (out, in)
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scale = torch.empty(weight.shape[0], dtype=torch.bfloat16, device=weight.device)
        for r in range(0, weight.shape[0], _ROWS):  # in row blocks: a 49K-row head needs no fp32 temporaries
            q[r:r + _ROWS], scale[r:r + _ROWS] = int8_rows(weight[r:r + _ROWS])
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_int8(cls, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        """A layer from int8 values (out, in) and bf16 row scales (out,) already made (a direct load)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return self

    def dequantized(self) -> torch.Tensor:
        """The float weight this layer computes with, (out, in) fp32."""
        return self.weight_int8.float() * self.scale.float()[:, None]

    def __getstate__(self):
        return _without_native_pack(super().__getstate__())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native.usable(x):  # gptlab's own kernel (float32 activations)
            packed = native.packed_int8(self) if self.rounds_activations else None
            return native.i8_matmul(x, self.weight_int8, self.scale, self.bias, self.rounds_activations,
                                    packed).to(x.dtype)
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


_INT4_OK: dict[str, bool] = {}


def _int4_kernel_works(device: torch.device) -> bool:
    """Whether aten._weight_int4pack_mm_for_cpu runs here (CPU only; checked once)."""
    key = device.type
    if key not in _INT4_OK:
        ok = False
        if key == "cpu":
            try:
                codes = torch.full((16, 32), 9, dtype=torch.int32)  # (c - 8) = 1 everywhere
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
                sz = torch.stack([torch.ones(1, 16), torch.zeros(1, 16)], -1).to(torch.bfloat16)  # (K/g, N, 2)
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.ones(1, 32, dtype=torch.bfloat16), packed, 32, sz)
                ok = bool(torch.allclose(y.float(), torch.full((1, 16), 32.0)))
            except (RuntimeError, NotImplementedError, AttributeError):
                ok = False
        _INT4_OK[key] = ok
    return _INT4_OK[key]


class Int4Linear(nn.Module):
    """A linear layer with 4-bit weights in groups of ``group_size`` inputs, each with a bf16 scale and minimum.

    Buffers: ``codes`` (out, in/2) uint8, two 4-bit codes per byte (even input
    index in the low nibble); ``scale`` and ``minimum`` (out, in/group) bf16.
    ``W[o, i] = minimum[o, g] + scale[o, g] · code[o, i]`` with ``g = i // group_size``.
    """

    def __init__(self, linear: nn.Linear, group_size: int = 32):
        super().__init__()
        out_f, in_f = linear.weight.shape
        if in_f % group_size:
            raise ValueError(f"in_features={in_f} is not a multiple of group_size={group_size}")
        weight = linear.weight.detach()
        packed = torch.empty(out_f, in_f // 2, dtype=torch.uint8, device=weight.device)
        scale = torch.empty(out_f, in_f // group_size, dtype=torch.bfloat16, device=weight.device)
        minimum = torch.empty_like(scale)
        for r in range(0, out_f, _ROWS):  # in row blocks, to bound fp32 temporaries
            w = weight[r:r + _ROWS].float().reshape(-1, in_f // group_size, group_size)  # (rows, G, g)
            lo, hi = w.amin(-1), w.amax(-1)  # (rows, G)
            s, m = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.bfloat16), lo.to(torch.bfloat16)
            codes = torch.round((w - m.float()[..., None]) / s.float()[..., None]).clamp(0, 15)
            codes = codes.to(torch.uint8).reshape(-1, in_f)
            packed[r:r + _ROWS] = codes[:, 0::2] | (codes[:, 1::2] << 4)
            scale[r:r + _ROWS], minimum[r:r + _ROWS] = s, m
        self.in_features, self.out_features, self.group_size = in_f, out_f, group_size
        self.register_buffer("codes", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("minimum", minimum)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self._packed: tuple | None = None  # PyTorch's int4 packing for its CPU kernel (native.cached_pack)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                   bias: torch.Tensor | None = None) -> "Int4Linear":
        """A layer from 4-bit codes (out, in) uint8 in 0..15 and bf16 ``scale``/``minimum`` (out, in/group).

        ``W = minimum + scale · code`` per group: a GGUF Q4_1 block as it is (Q4_0: minimum = -8 · scale).
        """
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = codes.shape
        self.group_size = self.in_features // scale.shape[1]
        self.register_buffer("codes", codes[:, 0::2] | (codes[:, 1::2] << 4))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("minimum", minimum.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._packed = None
        return self

    def unpacked_codes(self) -> torch.Tensor:
        """The 4-bit codes as (out, in) uint8."""
        c = self.codes
        return torch.stack([c & 0xF, c >> 4], dim=-1).reshape(self.out_features, self.in_features)

    def dequantized(self) -> torch.Tensor:
        """The float weight this layer computes with, (out, in) fp32."""
        c = self.unpacked_codes().float().reshape(self.out_features, -1, self.group_size)
        w = self.minimum.float()[..., None] + self.scale.float()[..., None] * c
        return w.reshape(self.out_features, self.in_features)

    def _kernel_args(self) -> tuple[torch.Tensor, torch.Tensor]:
        def make():
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.unpacked_codes().to(torch.int32), 1)
            zero = (self.minimum.float() + 8.0 * self.scale.float()).to(torch.bfloat16)
            return packed, torch.stack([self.scale, zero], dim=-1).transpose(0, 1).contiguous()  # (in/g, out, 2)
        return native.cached_pack(self, (self.codes, self.scale, self.minimum), make, slot="_packed")

    def __getstate__(self):
        return _without_native_pack(super().__getstate__())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size == 32 and native.usable(x):  # gptlab's own kernel: reads the codes as they are
            return native.q4_matmul(x, self.codes, self.scale, self.minimum, self.bias,
                                    native.packed_int4(self)).to(x.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (N, in)
        if self.out_features % 16 == 0 and _int4_kernel_works(x.device):  # the kernel packs rows in 16s
            packed, sz = self._kernel_args()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz)  # (N, out)
        else:
            y = x2 @ self.dequantized().to(torch.bfloat16).t()
        y = y.to(x.dtype).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 weights, group {self.group_size}"


def quantize_int4(model: nn.Module, group_size: int = 32) -> nn.Module:
    """Replace ``nn.Linear`` layers of ``model`` (in place) by :class:`Int4Linear`; returns the model.

    A gptlab model's output head (``model.get_head()``) becomes :class:`Int8Linear` (an int4
    head cost +7 % perplexity); a layer whose input width is not a multiple of ``group_size``
    becomes int8 too. Any other module is quantized layer by layer. For inference only.
    """
    head = model.get_head() if isinstance(model, LanguageModel) else None

    def make(name: str, mod: nn.Linear) -> nn.Module:
        if mod is head or mod.in_features % group_size:
            return Int8Linear(mod)
        return Int4Linear(mod, group_size)

    _replace_linears(model, make)
    head = model.get_head() if isinstance(model, LanguageModel) else None
    if isinstance(head, Int8Linear):  # (also a head a direct GGUF load made int8 already)
        head.rounds_activations = True  # its input rounded as the int4 layers round theirs
    return model


def _replace_linears(model: nn.Module, make, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace each ``nn.Linear`` (name not ending in ``skip``) by ``make(name, linear)``, in place.

    One layer at a time, holding no other reference: each float weight is freed as
    soon as its replacement is in place, so quantizing adds no second copy of the model.
    """
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not any(n.endswith(s) for s in skip)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        mod = getattr(parent, child)
        setattr(parent, child, make(name, mod).to(mod.weight.device))
        del mod
    native.use_native_layers(model)  # decoding a layer in one native call where the kernels run (same formula)
    return model.eval()


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by :class:`Int8Linear`; returns the model.

    ``skip`` lists module-name suffixes to leave in float (e.g. ``("lm_head",)``).
    A tied output head becomes an int8 copy; the embedding it was tied to stays float.
    For inference only: the int8 weights do not train.
    """
    return _replace_linears(model, lambda name, mod: Int8Linear(mod), skip)


SCHEMES = ("int4", "int8")


def check_scheme(scheme: str) -> str:
    """The scheme's canonical name (``"INT4"`` -> ``"int4"``); a clear error for anything else."""
    from gptlab.errors import GptlabError

    name = str(scheme).strip().lower()
    if name not in SCHEMES:
        raise GptlabError(f"quantize={scheme!r} is not a quantization scheme; use int4 or int8 "
                          "(weight-only), or omit it for full precision")
    return name


def apply_quantization(model: nn.Module, scheme: str) -> nn.Module:
    """Apply a named scheme (``"int8"`` or ``"int4"``, any case) to a loaded model; a clear error for anything else."""
    scheme = check_scheme(scheme)
    if scheme == "int8":
        return quantize_int8(model)
    return quantize_int4(model)
