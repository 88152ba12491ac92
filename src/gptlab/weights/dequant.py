"""Dequantizing GGUF tensors: the llama.cpp block formats, written out in NumPy.

A quantized GGUF tensor is a sequence of fixed-size *blocks*; each block holds
the scale(s) and the packed integers of ``block_size`` consecutive weights of
one row (rows are a multiple of the block size). Every function here takes the
raw bytes of N blocks as a uint8 array (N, type_size) and returns the weights
as float32 (N, block_size). The layout of each format is written above its
function, as byte ranges within one block; all multi-byte fields are
little-endian, ``f16`` is IEEE half precision.

Formats covered: F32, F16, BF16 (not blocked), Q8_0, Q4_0, Q4_1 (32-weight
blocks), and the "K-quants" Q4_K, Q5_K, Q6_K (256-weight super-blocks made of
16 or 8 sub-blocks with their own small integer scales). The reference these
are tested against is ``gguf.quants.dequantize`` from llama.cpp's Python package.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from gptlab.errors import GptlabError

QK = 32  # weights per block in the simple formats
QK_K = 256  # weights per super-block in the K formats


def _f16(blocks: np.ndarray, start: int, count: int = 1) -> np.ndarray:
    """Read ``count`` little-endian f16 values at byte ``start`` of every block -> (N, count) float32."""
    return np.ascontiguousarray(blocks[:, start:start + 2 * count]).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(N, n) packed bytes -> (N, 2n): all low nibbles first, then all high nibbles.

    This is the order llama.cpp packs 4-bit values in: byte j holds weight j in
    its low nibble and weight j + n in its high nibble.
    """
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


# ---- Q8_0: 34 bytes = d f16 [0:2] | q int8[32] [2:34];  w = d · q ----
def dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks, 0)  # (N, 1)
    q = blocks[:, 2:].view(np.int8).astype(np.float32)  # (N, 32)
    return d * q


# ---- Q4_0: 18 bytes = d f16 [0:2] | qs u8[16] [2:18];  w = d · (q - 8), q in 0..15 ----
def dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:]).astype(np.float32)  # (N, 32)
    return d * (q - 8.0)


# ---- Q4_1: 20 bytes = d f16 [0:2] | m f16 [2:4] | qs u8[16] [4:20];  w = d · q + m ----
def dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:]).astype(np.float32)
    return d * q + m


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12 bytes of eight 6-bit scales and eight 6-bit mins (Q4_K / Q5_K).

    Bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits. Scales
    and mins 4-7 have their low 4 bits in bytes 8-11 (scale: low nibble, min:
    high nibble) and their top 2 bits in the spare top bits of bytes 0-3 (scales)
    and 4-7 (mins). Returns two (N, 8) float32 arrays.
    """
    p = packed.astype(np.uint8)
    lo_sc, lo_m, hi = p[:, 0:4], p[:, 4:8], p[:, 8:12]
    sc = np.concatenate([lo_sc & 63, (hi & 0x0F) | ((lo_sc >> 6) << 4)], axis=-1)
    mn = np.concatenate([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_quads(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K 4-bit part: 128 bytes -> 256 values, in four 32-byte groups.

    Group g (bytes 32g..32g+31) holds sub-block 2g in its low nibbles and
    sub-block 2g+1 in its high nibbles. Returns (N, 8, 32) uint8.
    """
    g = qs.reshape(-1, 4, 32)  # (N, group, 32)
    return np.stack([g & 0x0F, g >> 4], axis=2).reshape(-1, 8, 32)  # (N, sub-block, 32)


# ---- Q4_K: 144 bytes = d f16 [0:2] | dmin f16 [2:4] | scales [4:16] | qs u8[128] [16:144] ----
# Eight sub-blocks of 32; sub-block s: w = d · sc_s · q - dmin · m_s.
def dequant_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # (N, 1)
    sc, mn = _k_scales_mins(blocks[:, 4:16])  # (N, 8)
    q = _k_quads(blocks[:, 16:144]).astype(np.float32)  # (N, 8, 32)
    w = (d * sc)[..., None] * q - (dmin * mn)[..., None]
    return w.reshape(-1, QK_K)


# ---- Q5_K: 176 bytes = d f16 [0:2] | dmin f16 [2:4] | scales [4:16] | qh u8[32] [16:48] | qs u8[128] [48:176] ----
# As Q4_K with a fifth bit: bit s of qh[l] is the high bit of weight l of sub-block s.
def dequant_q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scales_mins(blocks[:, 4:16])
    qh = blocks[:, 16:48]  # (N, 32)
    bit = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    high = (qh[:, None, :] >> bit) & 1  # (N, 8, 32)
    q = (_k_quads(blocks[:, 48:176]) | (high << 4)).astype(np.float32)  # 0..31
    w = (d * sc)[..., None] * q - (dmin * mn)[..., None]
    return w.reshape(-1, QK_K)


# ---- Q6_K: 210 bytes = ql u8[128] [0:128] | qh u8[64] [128:192] | scales int8[16] [192:208] | d f16 [208:210] ----
# Sixteen sub-blocks of 16; w = d · sc_s · (q - 32) with q 6 bits: 4 from ql, 2 from qh.
# The 256 weights are two halves of 128 (ql 64 bytes + qh 32 bytes each). Within a
# half, weight l + 32·j (l < 32, j < 4) takes its low nibble from ql[l] (j=0: low,
# j=2: high) or ql[l+32] (j=1: low, j=3: high), and its top 2 bits from bits 2j..2j+1 of qh[l].
def dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    ql = blocks[:, 0:128].reshape(-1, 2, 2, 32)  # (N, half, ql[l] or ql[l+32], l)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)  # (N, half, 1, l)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)  # (N, 16), one per 16 weights
    d = _f16(blocks, 208)  # (N, 1)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # (N, half, j, l) with j = 0..3
    shift = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    top = (qh >> shift) & 3  # (N, half, j, l)
    q = (low | (top << 4)).astype(np.float32) - 32.0  # (N, half, j, 32)
    w = q.reshape(-1, 16, 16) * (d * sc)[..., None]  # 16 sub-blocks of 16 consecutive weights
    return w.reshape(-1, QK_K)


def _plain(dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    def f(blocks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(blocks).view(dtype).astype(np.float32)
    return f


def _bf16(blocks: np.ndarray) -> np.ndarray:
    # bf16 is the top half of an f32: shift the 16 bits up.
    u16 = np.ascontiguousarray(blocks).view("<u2").astype(np.uint32)
    return (u16 << 16).view(np.float32)


# name -> (weights per block, bytes per block, function on (N, bytes) uint8 -> (N, weights) float32)
FORMATS: dict[str, tuple[int, int, Callable[[np.ndarray], np.ndarray]]] = {
    "F32": (1, 4, _plain("<f4")),
    "F16": (1, 2, _plain("<f2")),
    "BF16": (1, 2, _bf16),
    "Q8_0": (QK, 34, dequant_q8_0),
    "Q4_0": (QK, 18, dequant_q4_0),
    "Q4_1": (QK, 20, dequant_q4_1),
    "Q4_K": (QK_K, 144, dequant_q4_k),
    "Q5_K": (QK_K, 176, dequant_q5_k),
    "Q6_K": (QK_K, 210, dequant_q6_k),
}


def _blocks(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Check the byte count and view ``raw`` as (n_blocks, bytes per block) uint8."""
    if type_name not in FORMATS:
        raise GptlabError(f"GGUF tensor type {type_name} is not supported; supported: {', '.join(FORMATS)} "
                          "(re-quantize the file with llama.cpp to one of these)")
    per_block, nbytes, _ = FORMATS[type_name]
    n = int(np.prod(shape))
    b = np.asarray(raw).reshape(-1).view(np.uint8)
    if n % per_block or b.size != n // per_block * nbytes:
        raise GptlabError(f"GGUF tensor of type {type_name} and shape {shape} should have "
                          f"{n // per_block * nbytes} bytes but has {b.size}; the file is corrupt or truncated")
    return b.reshape(-1, nbytes)


def dequantize_chunks(raw: np.ndarray, type_name: str, shape: tuple[int, ...], *,
                      chunk_blocks: int = 1 << 16) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first weight index, float32 weights)`` pieces of a tensor, ``chunk_blocks`` blocks at a time.

    Lets a caller write each piece straight into a tensor of another dtype, so a
    full float32 copy of a large tensor never exists.
    """
    blocks = _blocks(raw, type_name, shape)
    per_block, _, fn = FORMATS[type_name]
    for s in range(0, blocks.shape[0], chunk_blocks):
        yield s * per_block, fn(blocks[s:s + chunk_blocks]).reshape(-1)


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...], *, chunk_blocks: int = 1 << 16) -> np.ndarray:
    """Dequantize the raw bytes of one GGUF tensor to a float32 array of ``shape``.

    Args:
        raw: the tensor's data as stored (any shape; uint8 bytes, or already typed
            for F32/F16 as ``GGUFReader`` returns them).
        type_name: the GGML type name, e.g. ``"Q4_K"``.
        shape: the logical shape in PyTorch order (rows, cols).
        chunk_blocks: blocks converted at a time, which bounds temporary memory.
    """
    out = np.empty(int(np.prod(shape)), dtype=np.float32)
    for start, piece in dequantize_chunks(raw, type_name, shape, chunk_blocks=chunk_blocks):
        out[start:start + piece.size] = piece
    return out.reshape(shape)
