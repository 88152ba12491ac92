"""What the model families share: the causal attention call, the KV cache, RoPE.

Shapes (legend in ``models/config.py``):
    q            (B, H, T, hd)
    k, v         (B, Hkv, S, hd)   S = tokens already cached + T
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class KVCache:
    """Preallocated per-layer key/value buffers for incremental decoding.

    ``pos`` is the number of tokens already stored. A model call with a cache
    appends its T new tokens at ``pos`` and attends over ``[0, pos + T)``; the
    model advances ``pos`` once per forward pass (after every layer wrote).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int,
                 head_dim: int, *, dtype: torch.dtype, device: torch.device | str):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new k/v (B, Hkv, T, hd) for `layer`; return all cached k/v so far."""
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(
                f"KV cache is full: {self.pos} cached + {T} new tokens > max_len {self.max_len}; "
                "create the cache with a larger max_len"
            )
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0


def causal_mask(T: int, S: int, device, window: int | None = None) -> torch.Tensor:
    """Boolean (T, S) mask, True where query i (at absolute position S - T + i) may attend.

    With ``window`` (Mistral's sliding window) a query also ignores keys more
    than ``window - 1`` positions behind it.
    """
    q_pos = torch.arange(S - T, S, device=device).unsqueeze(1)  # (T, 1)
    k_pos = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, impl: str = "sdpa",
           dropout_p: float = 0.0, window: int | None = None,
           scale: float | None = None) -> torch.Tensor:
    """Causal attention over keys that end at the query's last position.

    q (B, H, T, hd); k, v (B, Hkv, S, hd) with S >= T. Grouped-query attention
    repeats each KV head H/Hkv times (one-token decoding folds the query
    heads instead, without copies). Returns (B, H, T, hd).

    ``impl="math"`` is the explicit masked softmax the course teaches
    (softmax(QKᵀ/√hd + mask)·V); ``"sdpa"`` calls PyTorch's fused kernel. The two
    agree to float rounding (tested).
    """
    B, H, T, hd = q.shape
    S = k.shape[2]
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    if impl == "sdpa" and T == 1:
        # Decoding one token: it may see every cached key (or, with a sliding window,
        # the last `window` keys), so no mask is needed. Grouped-query heads are folded
        # into the query-length axis, (B, H, 1, hd) -> (B, Hkv, H/Hkv, hd): each KV
        # head serves its group of query heads without repeating K and V in memory.
        if window is not None and S > window:
            k, v = k[:, :, S - window:], v[:, :, S - window:]
        Hkv = k.shape[1]
        y = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, hd), k, v, dropout_p=dropout_p, scale=scale)
        return y.reshape(B, H, 1, hd)
    if k.shape[1] != H:
        rep = H // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
        v = v.repeat_interleave(rep, dim=1)
    if impl == "sdpa":
        if window is None and T == S:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
        mask = causal_mask(T, S, q.device, window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    # The course's path: scores, mask the future with -inf, softmax, weighted sum.
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    mask = causal_mask(T, S, q.device, window)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v  # (B, H, T, hd)


# ---- Rotary position embeddings (Su et al. 2021, https://arxiv.org/abs/2104.09864) ----

def rope_frequencies(head_dim: int, theta: float = 10000.0, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies θ_i = theta^(-2i/hd), i < hd/2, optionally with Llama 3 scaling.

    Llama 3.1 scaling (``scaling`` with ``factor``, ``low_freq_factor``,
    ``high_freq_factor``, ``original_max_position_embeddings``): wavelengths
    longer than original/low_freq_factor are divided by ``factor``, shorter than
    original/high_freq_factor are kept, and the band between is interpolated.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling:
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        orig = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen = orig / low
        high_wavelen = orig / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_mid, mid, scaled)
    return inv_freq.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for absolute ``positions`` (T,) -> each (T, hd), halves duplicated."""
    angles = positions.float().unsqueeze(1) * inv_freq.to(positions.device).unsqueeze(0)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) by the "rotate half" convention Hugging Face checkpoints use."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
