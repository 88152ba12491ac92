"""Bits per weight of the weight formats the fit planner sizes.

A GGUF quantized tensor is a run of fixed-size blocks (see ``weights/dequant.py``
for how each is decoded). Bits per weight = 8 · block bytes / weights per block,
so each figure below is derived from the block layout, written out as its byte
fields. The "_S/_M/_L" names are *file types*, not block types: llama.cpp
stores most tensors in one block type and some (``attn_v``, ``ffn_down``,
``output``) in a bigger one. Their figure is a blend and is an approximation —
the real mix depends on the architecture and layer count. The size of an actual
GGUF file is never approximated: the catalog reads its tensors' byte sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptlab.errors import GptlabError

# Block layouts: name -> (weights per block, {field: bytes}). Totals are the
# llama.cpp ``block_*`` struct sizes.
BLOCKS: dict[str, tuple[int, dict[str, int]]] = {
    "F32": (1, {"value f32": 4}),
    "F16": (1, {"value f16": 2}),
    "BF16": (1, {"value bf16": 2}),
    "Q8_0": (32, {"d f16": 2, "qs int8[32]": 32}),
    "Q5_1": (32, {"d f16": 2, "m f16": 2, "qh u8[4]": 4, "qs u8[16]": 16}),
    "Q5_0": (32, {"d f16": 2, "qh u8[4]": 4, "qs u8[16]": 16}),
    "Q4_1": (32, {"d f16": 2, "m f16": 2, "qs u8[16]": 16}),
    "Q4_0": (32, {"d f16": 2, "qs u8[16]": 16}),
    # K-quants: 256-weight super-blocks of sub-blocks with 4-8 bit scales.
    "Q6_K": (256, {"ql u8[128]": 128, "qh u8[64]": 64, "scales int8[16]": 16, "d f16": 2}),
    "Q5_K": (256, {"d f16": 2, "dmin f16": 2, "scales u8[12]": 12, "qh u8[32]": 32, "qs u8[128]": 128}),
    "Q4_K": (256, {"d f16": 2, "dmin f16": 2, "scales u8[12]": 12, "qs u8[128]": 128}),
    "Q3_K": (256, {"hmask u8[32]": 32, "qs u8[64]": 64, "scales u8[12]": 12, "d f16": 2}),
    "Q2_K": (256, {"scales u8[16]": 16, "qs u8[64]": 64, "d f16": 2, "dmin f16": 2}),
}


def block_bits(block: str) -> float:
    """Bits per weight of one block type: 8 · sum(field bytes) / weights per block."""
    n, fields = BLOCKS[block]
    return 8 * sum(fields.values()) / n


# File-type mixes: name -> (main block, bigger block, fraction of weights in the bigger one).
# The fractions approximate llama.cpp's choice of upgrading attn_v, ffn_down (half
# the layers) and the output matrix; they reproduce its published bits/weight.
MIXES: dict[str, tuple[str, str, float]] = {
    "Q5_K_M": ("Q5_K", "Q6_K", 0.17),
    "Q5_K_S": ("Q5_K", "Q6_K", 0.04),
    "Q4_K_M": ("Q4_K", "Q6_K", 0.17),
    "Q4_K_S": ("Q4_K", "Q5_K", 0.08),
    "Q3_K_M": ("Q3_K", "Q5_K", 0.22),
    "Q3_K_S": ("Q3_K", "Q3_K", 0.0),
    "Q2_K": ("Q2_K", "Q2_K", 0.0),
}


# gptlab's own weight quantization (``--quantize int8|int4``, gptlab/inference/quantize.py): the linear
# layers only; embeddings, norms and biases stay float. name -> (weights per block, {field: bytes}).
# INT8: one int8 per weight and one bf16 scale per output row (a "block" is a row of K = d inputs,
# so 8 + 16/d bits). INT4: GGUF Q4_1's block (32 4-bit codes, a bf16 scale and a bf16 minimum:
# 5.0 bits), with the output head int8 as under INT8.
GPTLAB_QUANTS: dict[str, tuple[int, dict[str, int]]] = {
    "INT8": (0, {"q int8": 1, "scale bf16 per row": 2}),
    "INT4": (32, {"codes u4[32]": 16, "scale bf16": 2, "min bf16": 2}),
}
# gptlab's native CPU kernel (inference/kernels.c) on AVX2 and the CUDA path read Int4Linear's own
# buffers: one copy of 5.0 bits is resident and read per token. (Where the native kernels cannot be
# built -- no C compiler, not x86 -- PyTorch's CPU kernel packs a second copy at the first forward.)
# On AVX-512 VNNI CPUs the native kernels also pack a copy at the first forward and read it instead:
# the 4-bit codes again with a float32 scale and minimum per 32 weights (INT4_VNNI_PACKED_BITS), and
# an int4 model's int8 head once more (INT8_VNNI_PACKED_BITS); ``estimate.cpu_packed_bytes`` counts them
# where ``Hardware.int4_packed``.
INT4_VNNI_PACKED_BITS = 4 + (32 + 32) / 32  # codes u4, then a float32 scale and minimum per 32 weights: 6.0
INT8_VNNI_PACKED_BITS = 8
INT4_RESIDENT_COPIES = 1


def gptlab_quant_bits(name: str, width: int) -> float:
    """Bits per linear weight of a gptlab format for rows of ``width`` inputs (INT8's scale is per row)."""
    n, fields = GPTLAB_QUANTS[name]
    if name == "INT8":
        return 8 * (fields["q int8"] + fields["scale bf16 per row"] / width)
    return 8 * sum(fields.values()) / n

@dataclass(frozen=True)
class Quant:
    """A weight format: its bits per weight and whether that figure is exact."""

    name: str
    bits: float
    exact: bool

    @property
    def bytes_per_weight(self) -> float:
        return self.bits / 8


def _build() -> dict[str, Quant]:
    table = {b: Quant(b, block_bits(b), True) for b in BLOCKS}
    for name, (main, big, frac) in MIXES.items():
        bits = (1 - frac) * block_bits(main) + frac * block_bits(big)
        table[name] = Quant(name, bits, frac == 0.0)
    for name in GPTLAB_QUANTS:  # the linear layers' figure at a 4096-wide row; estimate sizes each model exactly
        table[name] = Quant(name, gptlab_quant_bits(name, 4096), False)
    return table


QUANTS: dict[str, Quant] = _build()

# Ordered best quality first; the table picks the first one that fits well.
QUALITY_LADDER = ["BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]

# Formats gptlab's own PyTorch runtime computes in (GGUF weights are dequantized at load).
TORCH_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}

# KV-cache element formats (llama.cpp --cache-type-k/v names).
KV_QUANTS: dict[str, float] = {"f32": 4.0, "f16": 2.0, "bf16": 2.0,
                               "q8_0": block_bits("Q8_0") / 8, "q4_0": block_bits("Q4_0") / 8}

_ALIASES = {"FP32": "F32", "FLOAT32": "F32", "FP16": "F16", "FLOAT16": "F16", "BFLOAT16": "BF16",
            "Q4_K": "Q4_K", "Q5_K": "Q5_K", "Q3_K": "Q3_K"}


def canonical_name(name: str) -> str:
    """A weight format's name as the tables spell it (upper case; fp32/fp16/bf16 aliases resolved)."""
    key = str(name).upper().replace("-", "_")
    return _ALIASES.get(key, key)


def get_quant(name: str) -> Quant:
    """Look up a weight format by name (case-insensitive; fp32/fp16/bf16 accepted)."""
    key = canonical_name(name)
    if key not in QUANTS:
        raise GptlabError(f"unknown quant {name!r}; choose one of: {', '.join(QUANTS)}")
    return QUANTS[key]


def kv_bytes_per_element(kv_quant: str) -> float:
    """Bytes per cached K or V element for a KV-cache format (f16, q8_0, ...)."""
    key = str(kv_quant).lower()
    if key not in KV_QUANTS:
        raise GptlabError(f"unknown KV-cache format {kv_quant!r}; choose one of: {', '.join(KV_QUANTS)}")
    return KV_QUANTS[key]
