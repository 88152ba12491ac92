"""The GPT-2 family, read bottom-up: attention -> MLP -> block -> model.

Radford et al. 2019, "Language Models are Unsupervised Multitask Learners".
Pre-LN transformer: x + attn(LN(x)), then x + mlp(LN(x)); learned absolute
positions; GELU with the tanh approximation; 4x feed-forward.
Shapes follow the legend in ``models/config.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.models.attention import KVCache, attend
from gptlab.models.config import GPT2Config


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.emb_dim, 3 * inner, bias=cfg.qkv_bias)
        self.proj = nn.Linear(inner, cfg.emb_dim)
        self.drop_rate = cfg.drop_rate
        self.resid_drop = nn.Dropout(cfg.drop_rate)
        self.impl = cfg.attn_impl

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.n_heads * self.head_dim, dim=-1)
        # (B, T, H*hd) -> (B, H, T, hd)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, S, hd)
        p = self.drop_rate if self.training else 0.0
        y = attend(q, k, v, impl=self.impl, dropout_p=p)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*hd)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: d -> F -> d with GELU(tanh) between."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, cfg.hidden_dim)
        self.proj = nn.Linear(cfg.hidden_dim, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN transformer block with two residual connections."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


class GPT2(nn.Module):
    """GPT-2 language model: ``model(ids) -> logits``.

    ids (B, T) int64 -> logits (B, T, V). With a :class:`KVCache`, the T ids are
    taken to follow the ``cache.pos`` tokens already cached.
    """

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight
        if not self.tok_emb.weight.is_meta:  # on meta, a loader assigns the weights
            self.reset_parameters()

    def tie_weights(self) -> None:
        """Share the output head with the token embedding when ``cfg.tie_embeddings``."""
        if self.cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/√(2L)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, std=0.02)

    def features(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, d), before the output head."""
        B, T = ids.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.context_length:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds context_length {self.cfg.context_length}; "
                "crop the input (generate() does this) or use a model with a longer context"
            )
        pos = torch.arange(start, start + T, device=ids.device)
        x = self.drop(self.tok_emb(ids) + self.pos_emb(pos))  # (B, T, d)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.final_norm(x)

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.out_head(self.features(ids, cache))  # (B, T, V)

    def new_cache(self, batch: int, max_len: int | None = None, *, dtype=None, device=None) -> KVCache:
        """An empty KV cache sized for this model (default: its full context)."""
        p = self.tok_emb.weight
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_heads, max_len or self.cfg.context_length,
                       self.cfg.head_dim, dtype=dtype or p.dtype, device=device or p.device)
