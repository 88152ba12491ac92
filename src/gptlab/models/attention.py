"""What the model families share: the causal attention call, the KV caches, RoPE.

Shapes (legend in ``models/config.py``):
    q            (B, H, T, hd)
    k, v         (B, Hkv, S, hd)   S = tokens already cached + T (the longest row's, in a slot batch)
    mask         (B, 1, T, S)      bool, True where a query may attend (per-row, from a SlotBatch)
    N            slots of a SlotCache (its max_batch); L its max_len

A model call takes ``cache=None`` or a cache *view* that answers four questions
for the forward pass: where the new tokens sit (``positions``), how far the
keys reach (``end``), where this layer's k/v go (``update``) and which keys
each query may see (``mask``). Two views exist, over one storage
(:class:`SlotCache`): :class:`KVCache`, a rectangular batch whose rows share
one position counter (``generate``), and :class:`SlotBatch`, rows of a slot
cache each at its own positions (the batched engine, ``inference/engine.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class SlotCache:
    """Preallocated per-layer key/value buffers, ``n_layers`` × (N, Hkv, L, hd), one row (slot) per sequence.

    The cache only stores; a forward call addresses it through :meth:`rows`,
    which says which slots the batch's rows are and at which positions their
    new tokens go. Positions are the caller's: nothing here advances.

    With ``ring=W`` (Mistral's sliding window, W < max_len) each slot stores
    only its last W tokens, position p at index p % W: memory is bounded by the
    window whatever the sequence length. ``kpos`` (N, W) then records the
    absolute position held at each index (-1: empty), from which the masks
    are built.

    With ``spare=True`` each slot has one more index, ``max_len``, that no
    sequence uses: a :class:`StaticBatch`'s idle rows write their keys there.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int,
                 head_dim: int, *, dtype: torch.dtype, device: torch.device | str, ring: int | None = None,
                 spare: bool = False):
        self.ring = ring if ring is not None and ring < max_len else None
        if spare and self.ring:
            raise ValueError("a ring cache (sliding window) has no spare index: make it without spare=True")
        self.spare = spare
        shape = (batch, n_kv_heads, (self.ring or max_len) + int(spare), head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_batch, self.max_len = batch, max_len
        self.kpos = torch.full((batch, self.ring), -1, device=device) if self.ring else None

    def rows(self, slots: torch.Tensor, positions: torch.Tensor) -> "SlotBatch":
        """A view for one forward call: row b is slot ``slots[b]``, its T new tokens at ``positions[b]`` (B, T)."""
        return RingBatch(self, slots, positions) if self.ring else SlotBatch(self, slots, positions)

    def clear(self, slot: int) -> None:
        """Forget what a slot holds (a ring's positions; a plain slot is overwritten by position anyway)."""
        if self.kpos is not None:
            self.kpos[slot] = -1


class KVCache(SlotCache):
    """A rectangular batch over a :class:`SlotCache`: row b is slot b, and every row is at position ``pos``.

    ``pos`` is the number of tokens already stored. A model call with a cache
    appends its T new tokens at ``pos`` and attends over ``[0, pos + T)``; the
    model advances ``pos`` once per forward pass (after every layer wrote).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int,
                 head_dim: int, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__(n_layers, batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.pos = 0

    def positions(self, T: int, device) -> torch.Tensor:
        """Absolute positions of the T new tokens, shared by every row: (T,)."""
        return torch.arange(self.pos, self.pos + T, device=device)

    def end(self, T: int) -> int:
        """One past the last position this call writes."""
        return self.pos + T

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

    def mask(self, T: int, window: int | None) -> None:
        """No explicit mask: every row ends at the same position, so :func:`attend` builds the causal one."""
        return None

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0


class SlotBatch:
    """Rows of a :class:`SlotCache` for one forward call, each at its own positions.

    Row b is slot ``slots[b]`` (B,); its T new tokens sit at ``positions[b]``
    (B, T), consecutive from that row's own start. ``update`` writes them there
    and returns the keys [0, S) of those slots, S = the furthest row's end; a
    row's stale or not-yet-written keys past its own position are masked out.
    """

    def __init__(self, cache: SlotCache, slots: torch.Tensor, positions: torch.Tensor):
        if positions.dim() != 2 or slots.shape != positions.shape[:1]:
            raise ValueError(f"slots must be (B,) and positions (B, T); got {tuple(slots.shape)} "
                             f"and {tuple(positions.shape)}")
        S, lo, first_lo = int(positions.max()) + 1, int(positions.min()), int(positions[:, 0].max())
        if S > cache.max_len or lo < 0:
            raise ValueError(f"position {S - 1} is outside the slot cache (max_len {cache.max_len}); "
                             "create it with a larger max_len")
        self.cache, self.slots, self.pos, self.S = cache, slots, positions, S
        B, first = slots.shape[0], int(slots[0])
        contiguous = bool((slots == torch.arange(first, first + B, device=slots.device)).all())
        self._rows = slice(first, first + B) if contiguous else slots  # a slice reads without a copy
        self._masks: dict[int | None, torch.Tensor] = {}
        # every row's tokens at the same positions, ending at S - 1: attend's own causal mask is right
        self._uniform = first_lo == int(positions[:, 0].min()) and S == first_lo + positions.shape[1]

    def positions(self, T: int, device) -> torch.Tensor:
        """The new tokens' absolute positions, one row each: (B, T)."""
        if self.pos.shape[1] != T:
            raise ValueError(f"the slot batch has positions for {self.pos.shape[1]} tokens, the call has {T}")
        return self.pos.to(device)

    def end(self, T: int) -> int:
        """One past the furthest position this call writes."""
        return self.S

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, Hkv, T, hd) at each row's positions; return the rows' keys/values (B, Hkv, S, hd)."""
        at = (self.slots.unsqueeze(1), slice(None), self.pos)  # indexes (B, T, Hkv, hd)
        self.cache.k[layer][at] = k.transpose(1, 2)
        self.cache.v[layer][at] = v.transpose(1, 2)
        return self.cache.k[layer][self._rows, :, :self.S], self.cache.v[layer][self._rows, :, :self.S]

    def mask(self, T: int, window: int | None) -> torch.Tensor | None:
        """(B, 1, T, S) bool: query t of row b sees keys 0..positions[b, t] (the last ``window`` of them).

        None when every row sits at the same positions (one sequence, or a batch in step): then
        :func:`attend` uses its own causal mask, or none at all for one token (faster).
        """
        if self._uniform:
            return None
        if window not in self._masks:
            q_pos = self.pos.unsqueeze(-1)  # (B, T, 1)
            k_pos = torch.arange(self.S, device=self.pos.device)  # (S,)
            allowed = k_pos <= q_pos  # (B, T, S)
            if window is not None:
                allowed &= k_pos > q_pos - window
            self._masks[window] = allowed.unsqueeze(1)  # (B, 1, T, S)
        return self._masks[window]

    def advance(self, n: int) -> None:
        """Nothing: the caller owns each row's positions."""


class RingBatch(SlotBatch):
    """Rows of a ring :class:`SlotCache` (sliding window W): each slot keeps only its last W keys.

    A call attends over the ring's stored keys followed by its own T new ones
    (W + T keys, masked by their absolute positions: causal and within the
    window), then stores the new ones at index position % W. Reading before
    writing lets a chunk of T tokens see the keys it is about to overwrite.
    """

    def __init__(self, cache: SlotCache, slots: torch.Tensor, positions: torch.Tensor):
        super().__init__(cache, slots, positions)
        W, T = cache.ring, positions.shape[1]
        keep = min(T, W)  # of the T new tokens only the last W can stay in the ring
        self._at = (slots.unsqueeze(1), slice(None), positions[:, T - keep:] % W)  # indexes (B, keep, Hkv, hd)
        self._keep = keep
        self._key_pos = torch.cat([cache.kpos[slots], positions], dim=1)  # (B, W + T)
        self._written = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return stored + new k/v (B, Hkv, W + T, hd); store the new ones in the ring."""
        c = self.cache
        keys = torch.cat([c.k[layer][self.slots], k], dim=2)
        values = torch.cat([c.v[layer][self.slots], v], dim=2)
        c.k[layer][self._at] = k[:, :, -self._keep:].transpose(1, 2)
        c.v[layer][self._at] = v[:, :, -self._keep:].transpose(1, 2)
        self._written += 1
        if self._written == len(c.k):  # the last layer: the ring now holds these positions
            c.kpos[self._at[0], self._at[2]] = self.pos[:, -self._keep:]
        return keys, values

    def mask(self, T: int, window: int | None) -> torch.Tensor:
        """(B, 1, T, W + T) bool: a query sees stored or new keys at positions in (its - W, its]."""
        if window not in self._masks:
            q_pos = self.pos.unsqueeze(-1)  # (B, T, 1)
            k_pos = self._key_pos.unsqueeze(1)  # (B, 1, W + T)
            W = window or self.cache.ring
            allowed = (k_pos >= 0) & (k_pos <= q_pos) & (k_pos > q_pos - W)
            self._masks[window] = allowed.unsqueeze(1)
        return self._masks[window]


class StaticBatch(SlotBatch):
    """Every slot of a ``spare=True`` :class:`SlotCache`, one new token each, in shapes that never change:
    the view a captured decode step (a CUDA graph) replays with new contents.

    Row b is slot b; ``positions`` (N, 1) is a buffer the caller fills before each call, where an idle
    row holds ``max_len`` (the spare index): it writes its keys there and touches no slot's tokens. Each
    row attends over the first ``S`` stored keys (default: all ``max_len``; every active row's position
    must be below S), masked to its own position. Nothing here reads a tensor back to the host, so the
    step can be captured once and replayed. (A spare cache has no ring, so a sliding window never
    reaches back past S: the window needs no mask of its own.)
    """

    def __init__(self, cache: SlotCache, positions: torch.Tensor, S: int | None = None):
        if not cache.spare:
            raise ValueError("a static batch needs a slot cache made with spare=True (no sliding-window ring)")
        if positions.shape != (cache.max_batch, 1):
            raise ValueError(f"positions must be ({cache.max_batch}, 1), one per slot; got {tuple(positions.shape)}")
        S = cache.max_len if S is None else S
        if not 1 <= S <= cache.max_len:
            raise ValueError(f"the attended length {S} must be in 1..{cache.max_len} (the cache's max_len)")
        self.cache, self.pos, self.S, self.slots = cache, positions, S, None
        self._masks = {}

    def positions(self, T: int, device) -> torch.Tensor:
        """(N, 1) positions for embeddings and rotation; an idle row's spare index becomes the last real one."""
        if T != 1:
            raise ValueError(f"a static batch feeds one token per row; the call has {T}")
        return self.pos.clamp(max=self.cache.max_len - 1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each row's k/v (N, Hkv, 1, hd) at its position; return every slot's first S keys (N, Hkv, S, hd)."""
        at = self.pos.view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[3])  # (N, Hkv, 1, hd)
        self.cache.k[layer].scatter_(2, at, k.to(self.cache.k[layer].dtype))
        self.cache.v[layer].scatter_(2, at, v.to(self.cache.v[layer].dtype))
        return self.cache.k[layer][:, :, :self.S], self.cache.v[layer][:, :, :self.S]

    def mask(self, T: int, window: int | None) -> torch.Tensor:
        """(N, 1, 1, S) bool: row b sees keys 0..positions[b] (an idle row sees them all)."""
        if None not in self._masks:
            k_pos = torch.arange(self.S, device=self.pos.device)  # (S,)
            self._masks[None] = k_pos <= self.pos.view(-1, 1, 1, 1)
        return self._masks[None]


CacheView = KVCache | SlotBatch  # what a model call takes as ``cache``


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
           scale: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over keys that end at the query's last position (or as ``mask`` allows).

    q (B, H, T, hd); k, v (B, Hkv, S, hd) with S >= T. Grouped-query attention
    repeats each KV head H/Hkv times (one-token decoding folds the query
    heads instead, without copies). Returns (B, H, T, hd).

    ``mask`` (B, 1, T, S) bool, from a :class:`SlotBatch` whose rows sit at
    different positions, replaces the causal mask (it already holds the window).

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
        # A row mask (B, 1, 1, S) broadcasts over that folded axis.
        if mask is None and window is not None and S > window:
            k, v = k[:, :, S - window:], v[:, :, S - window:]
        Hkv = k.shape[1]
        y = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, hd), k, v, attn_mask=mask,
                                           dropout_p=dropout_p, scale=scale)
        return y.reshape(B, H, 1, hd)
    if k.shape[1] != H:
        rep = H // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
        v = v.repeat_interleave(rep, dim=1)
    if impl == "sdpa":
        if mask is None and window is None and T == S:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
        mask = causal_mask(T, S, q.device, window) if mask is None else mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    # The course's path: scores, mask the future with -inf, softmax, weighted sum.
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    mask = causal_mask(T, S, q.device, window) if mask is None else mask
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
    """cos/sin tables for absolute ``positions``, halves duplicated.

    (T,) shared positions -> each (T, hd); (B, T) per-row positions -> each
    (B, 1, T, hd), which broadcasts over the heads of (B, H, T, hd).
    """
    angles = positions.float().unsqueeze(-1) * inv_freq.to(positions.device).unsqueeze(0)  # (..., T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, hd)
    if positions.dim() == 2:
        angles = angles.unsqueeze(1)  # (B, 1, T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) by the "rotate half" convention Hugging Face checkpoints use."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
