"""The GPT-2 family, read bottom-up: attention -> MLP -> block -> model.

Radford et al. 2019, "Language Models are Unsupervised Multitask Learners".
Pre-LN transformer: x + attn(LN(x)), then x + mlp(LN(x)); learned absolute
positions; GELU with the tanh approximation (``mlp_act="gelu"``: the exact erf GELU that
nanoGPT's model uses); 4x feed-forward.
Shapes follow the legend in ``models/config.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.models import fused_attention
from gptlab.models.attention import CacheView, attend
from gptlab.models.base import LanguageModel
from gptlab.models.config import ConfigError, Family, KeyRule, ModelConfig, register_family, register_preset
from gptlab.models.fused_gelu import gelu


# GELU variants by name -> F.gelu's ``approximate`` argument. With PyTorch's kernels the exact one is
# 2.7x faster on CPUs without a fast vector tanh (AVX2: 0.56 vs 1.5 ms forward + backward for 768 x 512
# values); gptlab's native tanh GELU (fused_gelu.py) runs at ~0.6-0.8 ms.
GPT2_ACTS = {"gelu_tanh": "tanh", "gelu": "none"}


@dataclass
class GPT2Config(ModelConfig):
    """GPT-2: learned positions, pre-LN LayerNorm blocks, GELU(tanh) 4x MLP."""

    family: ClassVar[str] = "gpt2"

    drop_rate: float = 0.0
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    attn_impl: str = "sdpa"  # "sdpa" | "math" (the explicit masked softmax the course teaches)
    mlp_act: str = "gelu_tanh"  # "gelu_tanh" (GPT-2's own) | "gelu" (exact erf GELU: nanoGPT's nn.GELU())

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_dim is None:
            self.hidden_dim = 4 * self.emb_dim
        if self.n_kv_heads != self.n_heads:
            raise ConfigError("GPT-2 has no grouped-query attention: n_kv_heads must equal n_heads")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"drop_rate={self.drop_rate:g} must be in [0, 1)")
        if self.attn_impl not in ("sdpa", "math"):
            raise ConfigError(f"attn_impl={self.attn_impl!r} must be 'sdpa' or 'math'")
        if self.mlp_act not in GPT2_ACTS:
            raise ConfigError(f"mlp_act={self.mlp_act!r} must be one of {', '.join(GPT2_ACTS)}")

    def param_counts(self) -> dict[str, int]:
        d, F, L, V = self.emb_dim, self.hidden_dim, self.n_layers, self.vocab_size
        inner = self.n_heads * self.head_dim
        b = 1 if self.qkv_bias else 0
        attn = d * 3 * inner + b * 3 * inner + inner * d + d
        mlp = d * F + F + F * d + d
        norms = 2 * 2 * d
        block = attn + mlp + norms
        tok = V * d
        pos = self.context_length * d
        head = 0 if self.tie_embeddings else V * d
        total = tok + pos + L * block + 2 * d + head
        return {
            "total": total,
            "embedding": tok + pos,
            "non_embedding": total - tok - pos,
            "lm_head": V * d,
            "tied": V * d if self.tie_embeddings else 0,
            "per_block": block,
        }


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

    def forward(self, x: torch.Tensor, cache: CacheView | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x)  # (B, T, 3*H*hd)
        if cache is None and self.impl == "sdpa" and (self.drop_rate == 0 or not self.training) \
                and fused_attention.preferred(qkv, self.n_heads):  # CPU float32: one native call each way
            return self.resid_drop(self.proj(fused_attention.packed_causal_attention(qkv, self.n_heads)))
        q, k, v = qkv.split(self.n_heads * self.head_dim, dim=-1)
        # (B, T, H*hd) -> (B, H, T, hd)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, S, hd)
        mask = cache.mask(T, None) if cache is not None else None  # per-row (B, 1, T, S) in a slot batch
        p = self.drop_rate if self.training else 0.0
        y = attend(q, k, v, impl=self.impl, dropout_p=p, mask=mask)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*hd)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: d -> F -> d with GELU (tanh approximation unless ``mlp_act="gelu"``)."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, cfg.hidden_dim)
        self.proj = nn.Linear(cfg.hidden_dim, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.approximate = GPT2_ACTS[cfg.mlp_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(gelu(self.fc(x), self.approximate)))  # native on CPU float32


class Block(nn.Module):
    """Pre-LN transformer block with two residual connections."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: CacheView | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


class GPT2(LanguageModel):
    """GPT-2: token + learned position embeddings -> blocks -> LayerNorm -> head (see LanguageModel)."""

    EMBEDDING, BLOCKS, FINAL_NORM, HEAD = "tok_emb", "blocks", "final_norm", "out_head"

    def __init__(self, cfg: GPT2Config):
        super().__init__(cfg)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        if not self.tok_emb.weight.is_meta:  # on meta, a loader assigns the weights
            self.reset_parameters()

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

    def features(self, ids: torch.Tensor, cache: CacheView | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, d), before the output head."""
        B, T = ids.shape
        pos = self.positions(T, cache, ids.device)  # (T,), or (B, T) when each row has its own
        x = self.drop(self.tok_emb(ids) + self.pos_emb(pos))  # (B, T, d); pos_emb (T, d) or (B, T, d)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.final_norm(x)


# ---- GPT-2: transformers' GPT2LMHeadModel ----
HF_KEYS: tuple[KeyRule, ...] = (
    KeyRule("tok_emb.weight", "transformer.wte.weight"),
    KeyRule("pos_emb.weight", "transformer.wpe.weight"),
    KeyRule("blocks.{i}.norm1.weight", "transformer.h.{i}.ln_1.weight"),
    KeyRule("blocks.{i}.norm1.bias", "transformer.h.{i}.ln_1.bias"),
    KeyRule("blocks.{i}.attn.qkv.weight", "transformer.h.{i}.attn.c_attn.weight", transpose=True),
    KeyRule("blocks.{i}.attn.qkv.bias", "transformer.h.{i}.attn.c_attn.bias", when=lambda cfg: cfg.qkv_bias),
    KeyRule("blocks.{i}.attn.proj.weight", "transformer.h.{i}.attn.c_proj.weight", transpose=True),
    KeyRule("blocks.{i}.attn.proj.bias", "transformer.h.{i}.attn.c_proj.bias"),
    KeyRule("blocks.{i}.norm2.weight", "transformer.h.{i}.ln_2.weight"),
    KeyRule("blocks.{i}.norm2.bias", "transformer.h.{i}.ln_2.bias"),
    KeyRule("blocks.{i}.mlp.fc.weight", "transformer.h.{i}.mlp.c_fc.weight", transpose=True),
    KeyRule("blocks.{i}.mlp.fc.bias", "transformer.h.{i}.mlp.c_fc.bias"),
    KeyRule("blocks.{i}.mlp.proj.weight", "transformer.h.{i}.mlp.c_proj.weight", transpose=True),
    KeyRule("blocks.{i}.mlp.proj.bias", "transformer.h.{i}.mlp.c_proj.bias"),
    KeyRule("final_norm.weight", "transformer.ln_f.weight"),
    KeyRule("final_norm.bias", "transformer.ln_f.bias"),
    KeyRule("out_head.weight", "lm_head.weight", when=lambda cfg: not cfg.tie_embeddings),
)



# ---- transformers' config.json <-> GPT2Config (used by weights/hf.py and weights/export.py) ----
def _require(hf: dict, key: str, arch: str):
    if hf.get(key) is None:
        raise GptlabError(f"config.json for {arch} has no {key!r}; the file is incomplete or not a {arch} config")
    return hf[key]


# transformers' activation names -> ours (the tanh GELU has three spellings; "gelu" is the exact one).
HF_GPT2_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu": "gelu"}


def hf_config(hf: dict, arch: str) -> GPT2Config:
    """A transformers ``GPT2LMHeadModel`` config.json -> :class:`GPT2Config` (GptlabError if unsupported)."""
    act = hf.get("activation_function", "gelu_new")
    if act not in HF_GPT2_ACTS:
        raise GptlabError(f"GPT-2 activation_function={act!r} is not supported (supported: "
                          f"{', '.join(HF_GPT2_ACTS)})")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise GptlabError(f"GPT-2 option {flag}=true is not supported by gptlab's GPT-2")
    if hf.get("scale_attn_weights") is False:
        raise GptlabError("GPT-2 option scale_attn_weights=false is not supported by gptlab's GPT-2")
    return GPT2Config(
        vocab_size=_require(hf, "vocab_size", arch),
        context_length=hf.get("n_positions") or _require(hf, "n_ctx", arch),
        emb_dim=_require(hf, "n_embd", arch),
        n_layers=_require(hf, "n_layer", arch),
        n_heads=_require(hf, "n_head", arch),
        hidden_dim=hf.get("n_inner"),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        qkv_bias=True,
        mlp_act=HF_GPT2_ACTS[act],
    )


def hf_export(cfg: GPT2Config) -> tuple[str, dict]:
    """:class:`GPT2Config` -> (``GPT2LMHeadModel``, its transformers config.json)."""
    if not cfg.qkv_bias:
        raise GptlabError("GPT-2 without q/k/v bias (qkv_bias=False) has no transformers equivalent; "
                          "export a model trained with qkv_bias=True")
    n_inner = cfg.hidden_dim if cfg.hidden_dim != 4 * cfg.emb_dim else None
    return "GPT2LMHeadModel", {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": n_inner,
        "activation_function": "gelu_new" if cfg.mlp_act == "gelu_tanh" else "gelu", "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": 50256, "eos_token_id": 50256,
    }


register_family(Family("gpt2", GPT2Config, GPT2, hf_keys=HF_KEYS, hf_prefix="transformer.",
                       hf_architectures=("GPT2LMHeadModel",), hf_config=hf_config, hf_export=hf_export))

# ---- presets: OpenAI's four sizes, plus small ones that train on a laptop CPU ----
for _name, (_L, _d, _H) in {
    "gpt2-124m": (12, 768, 12),
    "gpt2-355m": (24, 1024, 16),
    "gpt2-774m": (36, 1280, 20),
    "gpt2-1558m": (48, 1600, 25),
}.items():
    register_preset(_name, GPT2Config(n_layers=_L, emb_dim=_d, n_heads=_H, context_length=1024))

# Small CPU presets; vocab_size is replaced by the tokenizer's at train time.
register_preset("gpt2-mini", GPT2Config(n_layers=6, emb_dim=384, n_heads=6, context_length=256, drop_rate=0.1))
register_preset("gpt2-micro", GPT2Config(n_layers=4, emb_dim=256, n_heads=4, context_length=128, drop_rate=0.1))
register_preset("gpt2-nano", GPT2Config(n_layers=2, emb_dim=64, n_heads=2, context_length=64, drop_rate=0.1))
