"""Chapter 4 of the course: implementing a GPT model from scratch.

Built bottom-up in the course's order, with PyTorch's default initialisation,
so that ``torch.manual_seed(123); GPTModel(cfg)`` draws exactly the course's
weights (module creation order = order of random draws):

    tok_emb, pos_emb, drop_emb,
    trf_blocks[i] = (att.W_query, att.W_key, att.W_value, att.out_proj,
                     ff.layers[0], ff.layers[2], norm1, norm2, drop_shortcut),
    final_norm, out_head

The config is the course's plain dict with keys ``vocab_size, context_length,
emb_dim, n_heads, n_layers, drop_rate, qkv_bias``.

Full strength: ``gptlab.models.gpt2.GPT2`` with ``gptlab.GPT2Config`` (fused
q/k/v, fused attention kernel, KV-cached decoding, GPT-2's scaled init); move a
model across with :func:`gptlab.book.book_to_gptlab`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gptlab.book.ch03 import MultiHeadAttention
from gptlab.errors import GptlabError

#: GPT-2 small as chapter 5 trains it: a 256-token context (chapter 4 uses 1024).
GPT_CONFIG_124M = {
    "vocab_size": 50257,
    "context_length": 256,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}

#: The four published GPT-2 sizes, as the course names them (merge into a base config).
model_configs = {
    "gpt2-small (124M)": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium (355M)": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large (774M)": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl (1558M)": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25},
}

CONFIG_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")


def check_config(cfg: dict) -> None:
    """Raise a GptlabError naming any missing or out-of-range course config key."""
    if not isinstance(cfg, dict):
        raise GptlabError(f"the config must be a dict with keys {', '.join(CONFIG_KEYS)}; got {type(cfg).__name__}")
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise GptlabError(f"config lacks {', '.join(missing)}; start from a copy of GPT_CONFIG_124M")
    for k in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
        if not isinstance(cfg[k], int) or isinstance(cfg[k], bool) or cfg[k] < 1:
            raise GptlabError(f"config {k}={cfg[k]!r} must be a positive integer")
    if cfg["emb_dim"] % cfg["n_heads"]:
        raise GptlabError(f"emb_dim={cfg['emb_dim']} must be divisible by n_heads={cfg['n_heads']}")
    if not 0.0 <= cfg["drop_rate"] < 1.0:
        raise GptlabError(f"drop_rate={cfg['drop_rate']} must be in [0, 1)")


class LayerNorm(nn.Module):
    """Layer normalisation over the last dim with learnable ``scale`` and ``shift``.

    (x - mean) / sqrt(var + eps), biased variance, eps = 1e-5 — the same numbers
    as ``nn.LayerNorm`` (whose ``weight``/``bias`` are our ``scale``/``shift``).
    Full strength: ``nn.LayerNorm`` as used in ``gptlab.models.gpt2``.
    """

    def __init__(self, emb_dim: int):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


class GELU(nn.Module):
    """GELU, tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (Hendrycks & Gimpel 2016).

    Full strength: ``F.gelu(x, approximate="tanh")`` (one fused kernel), as gptlab's GPT-2 uses.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


class FeedForward(nn.Module):
    """Position-wise MLP: emb_dim -> 4·emb_dim -> GELU -> emb_dim (``layers`` = Sequential).

    Full strength: ``gptlab.models.gpt2.MLP``.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LN block: x + drop(att(norm1(x))), then x + drop(ff(norm2(x))).

    Full strength: ``gptlab.models.gpt2.Block``.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"], d_out=cfg["emb_dim"], context_length=cfg["context_length"],
            num_heads=cfg["n_heads"], dropout=cfg["drop_rate"], qkv_bias=cfg["qkv_bias"],
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.drop_shortcut(self.att(self.norm1(x)))  # (b, T, d)
        x = x + shortcut
        shortcut = x
        x = self.drop_shortcut(self.ff(self.norm2(x)))
        return x + shortcut


class GPTModel(nn.Module):
    """The course's GPT: ``model(in_idx) -> logits``, in_idx (b, T) ids -> (b, T, vocab_size).

    Attributes: ``tok_emb, pos_emb, drop_emb, trf_blocks, final_norm, out_head``.
    The output head is not tied to the token embedding (so 163,009,536
    parameters at context 1024, 162,419,712 at 256).

    Full strength: ``gptlab.build_model(gptlab.get_preset("gpt2-124m"))`` — a
    ``gptlab.models.gpt2.GPT2``; convert with :func:`gptlab.book.book_to_gptlab`.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        check_config(cfg)
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len = in_idx.shape
        if seq_len > self.pos_emb.num_embeddings:
            raise GptlabError(f"input has {seq_len} tokens but context_length is {self.pos_emb.num_embeddings}; "
                              "crop it with idx[:, -context_length:] (generate_text_simple does)")
        tok_embeds = self.tok_emb(in_idx)  # (b, T, d)
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))  # (T, d)
        x = self.drop_emb(tok_embeds + pos_embeds)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        return self.out_head(x)  # (b, T, vocab_size)


def generate_text_simple(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int) -> torch.Tensor:
    """Greedy decoding: append the most likely next token ``max_new_tokens`` times.

    idx (b, T) -> (b, T + max_new_tokens). Each step recomputes the whole
    (cropped) sequence. Full strength: ``gptlab.generate(model, ids, n)`` (KV
    cache, sampling filters, stop tokens) — same greedy tokens, far fewer FLOPs.
    """
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise GptlabError(f"idx must be a (batch, n_tokens) tensor with at least one token; got shape {tuple(idx.shape)} "
                          "(add the batch dimension with .unsqueeze(0))")
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]  # crop to the supported context
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]  # (b, vocab) last position only
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)  # (b, 1)
        idx = torch.cat((idx, idx_next), dim=1)  # (b, T+1)
    return idx
