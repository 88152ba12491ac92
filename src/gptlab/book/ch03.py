"""Chapter 3 of the course: coding attention mechanisms, one step at a time.

From a self-attention with raw weight matrices, to ``nn.Linear`` projections,
to a causal mask with dropout, to several heads (first stacked, then folded
into one module). Every class keeps the course's constructor signature and
attribute names (``W_query``, ``W_key``, ``W_value``, ``out_proj``, ``mask``).

Legend: b batch, T num_tokens, d_in / d_out embedding widths, H num_heads,
hd head_dim = d_out // H.

Full strength: ``gptlab.models.gpt2.CausalSelfAttention`` (one fused q/k/v
projection, PyTorch's fused attention kernel, a KV cache for decoding) built
on ``gptlab.models.attention.attend``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gptlab.errors import GptlabError


class SelfAttention_v1(nn.Module):
    """Scaled dot-product self-attention with plain weight matrices (no mask).

    x (T, d_in) -> context vectors (T, d_out). Weights start uniform in [0, 1)
    (``torch.rand``), as in the course. Full strength: ``gptlab.models.attention.attend``.
    """

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = x @ self.W_key  # (T, d_out)
        queries = x @ self.W_query
        values = x @ self.W_value
        attn_scores = queries @ keys.T  # (T, T) omega
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        return attn_weights @ values  # (T, d_out)


class SelfAttention_v2(nn.Module):
    """Self-attention with ``nn.Linear`` projections (better initialisation than v1).

    Full strength: ``gptlab.models.attention.attend``.
    """

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = self.W_key(x)  # (T, d_out)
        queries = self.W_query(x)
        values = self.W_value(x)
        attn_scores = queries @ keys.T  # (T, T)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        return attn_weights @ values


def _check_tokens(num_tokens: int, context_length: int) -> None:
    if num_tokens > context_length:
        raise GptlabError(f"input has {num_tokens} tokens but the attention's context_length is "
                          f"{context_length}; crop the input or build the module with a larger context_length")


class CausalAttention(nn.Module):
    """Single-head causal self-attention on batches, with dropout on the weights.

    x (b, T, d_in) -> (b, T, d_out). Future positions are masked with -inf
    before the softmax, using the ``mask`` buffer (1 above the diagonal).
    Full strength: ``gptlab.models.attention.attend(q, k, v, impl="math")`` (same masked softmax).
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False):
        super().__init__()
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, num_tokens, d_in = x.shape
        _check_tokens(num_tokens, self.mask.shape[0])
        keys = self.W_key(x)  # (b, T, d_out)
        queries = self.W_query(x)
        values = self.W_value(x)
        attn_scores = queries @ keys.transpose(1, 2)  # (b, T, T)
        attn_scores.masked_fill_(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        return attn_weights @ values  # (b, T, d_out)


class MultiHeadAttentionWrapper(nn.Module):
    """``num_heads`` independent :class:`CausalAttention` heads, outputs concatenated.

    x (b, T, d_in) -> (b, T, num_heads * d_out).
    Full strength: ``gptlab.models.gpt2.CausalSelfAttention`` (all heads in one matmul).
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False):
        super().__init__()
        if num_heads < 1:
            raise GptlabError(f"num_heads={num_heads} must be >= 1")
        self.heads = nn.ModuleList(
            CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(x) for head in self.heads], dim=-1)


class MultiHeadAttention(nn.Module):
    """Multi-head causal attention in one module: project once, split into heads.

    x (b, T, d_in) -> (b, T, d_out); each of the H heads works on hd = d_out / H
    dimensions, and ``out_proj`` mixes the concatenated heads.
    Full strength: ``gptlab.models.gpt2.CausalSelfAttention`` (fused q/k/v, SDPA, KV cache).
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False):
        super().__init__()
        if num_heads < 1 or d_out % num_heads:
            raise GptlabError(f"d_out={d_out} must be divisible by num_heads={num_heads}; "
                              "choose a head count that divides the embedding size")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, num_tokens, d_in = x.shape
        _check_tokens(num_tokens, self.mask.shape[0])
        keys = self.W_key(x)  # (b, T, d_out)
        queries = self.W_query(x)
        values = self.W_value(x)
        # (b, T, d_out) -> (b, T, H, hd) -> (b, H, T, hd)
        keys = keys.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = values.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        attn_scores = queries @ keys.transpose(2, 3)  # (b, H, T, T)
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]
        attn_scores.masked_fill_(mask_bool, -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        context = (attn_weights @ values).transpose(1, 2)  # (b, T, H, hd)
        context = context.contiguous().view(b, num_tokens, self.d_out)  # (b, T, d_out)
        return self.out_proj(context)
