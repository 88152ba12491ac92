"""The Llama family, read bottom-up: RMSNorm -> MLP -> attention -> decoder layer -> model.

One file covers Llama 2, Llama 3 / 3.x, Mistral, Qwen2, SmolLM2 and Gemma (1).
Their differences are config fields, never model names:

    rope_theta, rope_scaling   RoPE base and Llama 3.1 frequency scaling
    n_kv_heads                 grouped-query attention (Llama 2 70B, Llama 3, Mistral, ...)
    sliding_window             Mistral: each token sees only the last W tokens
    qkv_bias                   Qwen2: bias on the q/k/v projections
    mlp_act                    "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU)
    embed_scale                Gemma: embeddings multiplied by √d
    norm_unit_offset           Gemma: RMSNorm scales by (1 + w) instead of w
    n_experts, experts_per_token, norm_topk, shared_expert_dim, router_aux_loss_coef
                               Mixtral / Qwen2-MoE: a mixture of experts instead of the MLP (models/moe.py)

Versus GPT-2 (``models/gpt2.py``): RMSNorm instead of LayerNorm, rotary
positions instead of learned ones, a gated feed-forward, no biases, and
usually untied output weights. Module names follow the Hugging Face
checkpoints (``q_proj``, ``gate_proj``, ``input_layernorm``, ...) so the key
map in ``weights/keymaps.py`` is near 1:1. Shapes follow the legend in
``models/config.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.models.attention import CacheView, apply_rope, attend, rope_cos_sin, rope_frequencies
from gptlab.models.base import LanguageModel
from gptlab.models.config import ConfigError, Family, KeyRule, ModelConfig, register_family, register_preset
from gptlab.models.moe import (HF_MOE_KEYS, MIXTRAL, QWEN2_MOE, SparseMoE, balance_loss, check_moe_fields,
                               hf_moe_arch, hf_moe_export, hf_moe_fields, mlp_params)

MLP_ACTS = ("silu", "gelu_tanh")
_HAS_RMS_NORM = hasattr(F, "rms_norm")  # PyTorch >= 2.4
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LlamaConfig(ModelConfig):
    """Llama-style decoder: RMSNorm, RoPE, gated MLP, optional GQA / sliding window.

    ``hidden_dim`` (the gated MLP's width F) is required: published models do
    not follow one formula (Llama 2 7B: 11008 for d=4096; Llama 3 8B: 14336).
    With ``n_experts`` > 0 the MLP is a mixture of experts (``models/moe.py``):
    ``hidden_dim`` is then each expert's width, ``experts_per_token`` of them
    run per token, their weights renormalised when ``norm_topk``; an optional
    shared expert of width ``shared_expert_dim`` (Qwen2-MoE) runs for every
    token; training adds ``router_aux_loss_coef`` x the load-balancing loss.
    """

    family: ClassVar[str] = "llama"

    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3.1: factor, low/high_freq_factor, original_max_position_embeddings
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    mlp_act: str = "silu"
    embed_scale: bool = False
    norm_unit_offset: bool = False
    sliding_window: int | None = None
    bos_id: int | None = None
    eos_id: int | list[int] | None = None
    attn_impl: str = "sdpa"  # "sdpa" | "math"
    n_experts: int = 0  # 0: a dense MLP; E > 0: a mixture of E experts
    experts_per_token: int = 0  # k: experts each token runs (Mixtral: 2 of 8)
    norm_topk: bool = True  # renormalise the k router weights to sum to 1 (Mixtral; Qwen2-MoE's norm_topk_prob)
    shared_expert_dim: int | None = None  # width of a shared expert every token runs (Qwen2-MoE), gated by sigmoid
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss added when training

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_dim is None:
            raise ConfigError(
                "llama config needs hidden_dim (the MLP width F); published models use about "
                f"8/3·emb_dim rounded up, e.g. hidden_dim={_suggest_hidden(self.emb_dim)} for emb_dim={self.emb_dim}"
            )
        if not isinstance(self.hidden_dim, int) or self.hidden_dim < 1:
            raise ConfigError(f"hidden_dim={self.hidden_dim!r} must be a positive integer")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.mlp_act not in MLP_ACTS:
            raise ConfigError(f"mlp_act={self.mlp_act!r} must be one of {', '.join(MLP_ACTS)}")
        if self.attn_impl not in ("sdpa", "math"):
            raise ConfigError(f"attn_impl={self.attn_impl!r} must be 'sdpa' or 'math'")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta={self.rope_theta} must be > 0")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps={self.norm_eps} must be > 0")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window={self.sliding_window} must be >= 1 (or None for full attention)")
        if self.rope_scaling is not None:
            missing = [k for k in ROPE_SCALING_KEYS if k not in self.rope_scaling]
            if missing:
                raise ConfigError(
                    f"rope_scaling is missing {', '.join(missing)}; Llama 3 scaling needs all of "
                    f"{', '.join(ROPE_SCALING_KEYS)} (or set rope_scaling=None)"
                )
        check_moe_fields(self)

    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts by group (tied output weights counted once); ``active``: k of E experts."""
        d, L, V = self.emb_dim, self.n_layers, self.vocab_size
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        bias = (q_out + 2 * kv_out) if self.qkv_bias else 0
        attn = d * q_out + 2 * d * kv_out + bias + q_out * d
        mlp, mlp_active = mlp_params(self)
        block = attn + mlp + 2 * d  # two RMSNorm weights
        tok = V * d
        head = 0 if self.tie_embeddings else V * d
        total = tok + L * block + d + head
        return {
            "total": total,
            "active": total - L * (mlp - mlp_active),
            "experts": self.n_experts,
            "experts_active": self.experts_per_token,
            "experts_shared": int(bool(self.shared_expert_dim)),
            "embedding": tok,
            "non_embedding": total - tok,
            "lm_head": V * d,
            "tied": V * d if self.tie_embeddings else 0,
            "per_block": block,
        }


def _suggest_hidden(d: int) -> int:
    return 256 * math.ceil(8 * d / 3 / 256)


# ---- building blocks ----

class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467).

    x / sqrt(mean(x²) + eps), computed in fp32 and cast back (as the Hugging
    Face reference does, so bf16 results match). With ``unit_offset`` (Gemma)
    the learned scale is (1 + w), so w is initialised to 0.
    """

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not self.unit_offset and _HAS_RMS_NORM:
            # the same formula as below, as one fused op (decoding calls this 2L+1 times per token)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma scales in fp32, then casts
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)  # Llama casts, then scales


class GatedMLP(nn.Module):
    """SwiGLU / GeGLU feed-forward (Shazeer 2020, https://arxiv.org/abs/2002.05202).

    down(act(gate(x)) * up(x)): d -> F (twice) -> d, no biases. ``width`` overrides F
    (a mixture of experts' shared expert).
    """

    def __init__(self, cfg: LlamaConfig, width: int | None = None):
        super().__init__()
        width = width or cfg.hidden_dim
        self.gate_proj = nn.Linear(cfg.emb_dim, width, bias=False)
        self.up_proj = nn.Linear(cfg.emb_dim, width, bias=False)
        self.down_proj = nn.Linear(width, cfg.emb_dim, bias=False)
        self.act = F.silu if cfg.mlp_act == "silu" else (lambda t: F.gelu(t, approximate="tanh"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # (B, T, d)


class Attention(nn.Module):
    """Causal self-attention with rotary positions and grouped-query K/V heads."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.emb_dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.emb_dim, bias=False)
        self.window, self.impl = cfg.sliding_window, cfg.attn_impl

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: CacheView | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # rotate before caching
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, hd)
        mask = cache.mask(T, self.window) if cache is not None else None  # per-row (B, 1, T, S) in a slot batch
        y = attend(q, k, v, impl=self.impl, window=self.window, mask=mask)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*hd)
        return self.o_proj(y)  # (B, T, d)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); the mlp is a mixture of experts if n_experts."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.emb_dim, cfg.norm_eps, cfg.norm_unit_offset)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.emb_dim, cfg.norm_eps, cfg.norm_unit_offset)
        self.mlp = SparseMoE(cfg, GatedMLP) if cfg.n_experts else GatedMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: CacheView | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(LanguageModel):
    """Llama family: token embedding -> decoder layers with RoPE -> RMSNorm -> head (see LanguageModel)."""

    EMBEDDING, BLOCKS, FINAL_NORM, HEAD = "embed_tokens", "layers", "norm", "lm_head"

    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg)
        # RoPE inverse frequencies (hd/2,): derived from the config, never saved.
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.emb_dim, cfg.norm_eps, cfg.norm_unit_offset)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if not self.embed_tokens.weight.is_meta:  # on meta, a loader assigns weights, then calls finish_loading()
            self.reset_parameters()
        self.tie_weights()

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after building on the meta device)."""
        device = self.norm.weight.device
        self.inv_freq = rope_frequencies(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling).to(device)

    def reset_parameters(self) -> None:
        """N(0, 0.02) weights, residual outputs scaled by 1/√(2L), norms at identity."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:  # identity scale: w = 1, or w = 0 with Gemma's (1 + w)
                nn.init.constant_(p, 0.0 if self.cfg.norm_unit_offset else 1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, std=0.02)
        self.reset_buffers()

    def aux_loss(self) -> torch.Tensor | None:
        """``router_aux_loss_coef`` x the load-balancing loss of the last forward call (a mixture of experts)."""
        if not self.cfg.n_experts or not self.cfg.router_aux_loss_coef:
            return None
        loss = balance_loss([layer.mlp for layer in self.layers])
        return None if loss is None else self.cfg.router_aux_loss_coef * loss

    def features(self, ids: torch.Tensor, cache: CacheView | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, d), before the output head."""
        B, T = ids.shape
        pos = self.positions(T, cache, ids.device)  # (T,), or (B, T) when each row has its own
        x = self.embed_tokens(ids)  # (B, T, d)
        if self.cfg.embed_scale:  # Gemma: √d, rounded to the activation dtype as in the reference
            x = x * torch.tensor(self.cfg.emb_dim ** 0.5, dtype=x.dtype)
        cos, sin = rope_cos_sin(self.inv_freq, pos, x.dtype)  # each (T, hd) or (B, 1, T, hd)
        fused = getattr(self.layers, "decode", None)  # gptlab.inference.native: a decode step in one call
        out = fused(x, cos, sin, cache) if fused is not None else None
        if out is None:
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, cache, i)
        else:
            x = out
        if cache is not None:
            cache.advance(T)
        return self.norm(x)


# ---- Llama family: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GemmaForCausalLM (+ MoE rows) ----
def _dense(cfg: LlamaConfig) -> bool:
    return not cfg.n_experts


HF_KEYS: tuple[KeyRule, ...] = (
    KeyRule("embed_tokens.weight", "model.embed_tokens.weight"),
    KeyRule("layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight"),
    KeyRule("layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    KeyRule("layers.{i}.self_attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    KeyRule("layers.{i}.self_attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    KeyRule("layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.q_proj.bias", when=lambda cfg: cfg.qkv_bias),
    KeyRule("layers.{i}.self_attn.k_proj.bias", "model.layers.{i}.self_attn.k_proj.bias", when=lambda cfg: cfg.qkv_bias),
    KeyRule("layers.{i}.self_attn.v_proj.bias", "model.layers.{i}.self_attn.v_proj.bias", when=lambda cfg: cfg.qkv_bias),
    KeyRule("layers.{i}.self_attn.o_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    KeyRule("layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    KeyRule("layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.weight", when=_dense),
    KeyRule("layers.{i}.mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight", when=_dense),
    KeyRule("layers.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight", when=_dense),
    *HF_MOE_KEYS,  # Mixtral's and Qwen2-MoE's expert names (models/moe.py)
    KeyRule("norm.weight", "model.norm.weight"),
    KeyRule("lm_head.weight", "lm_head.weight", when=lambda cfg: not cfg.tie_embeddings),
)



# ---- transformers' config.json <-> LlamaConfig (used by weights/hf.py and weights/export.py) ----
# HF activation names -> ours (the tanh GELU has three spellings).
HF_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
           "gelu_tanh": "gelu_tanh"}


def _require(hf: dict, key: str, arch: str):
    if hf.get(key) is None:
        raise GptlabError(f"config.json for {arch} has no {key!r}; the file is incomplete or not a {arch} config")
    return hf[key]


def _hf_rope(hf: dict) -> tuple[float, dict | None]:
    """(theta, Llama 3 scaling or None) from either the v4 or the v5 config layout."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = hf.get("rope_theta") or params.get("rope_theta") or 10000.0
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise GptlabError(f"RoPE scaling type {kind!r} is not supported (gptlab supports the default and 'llama3')")
    return float(theta), {k: scaling[k] for k in ROPE_SCALING_KEYS if k in scaling}


def _hf_activation(hf: dict, arch: str) -> str:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if arch == "GemmaForCausalLM" and act == "gelu":  # Gemma's legacy spelling means the tanh approximation
        act = "gelu_pytorch_tanh"
    if act not in HF_ACTS:
        raise GptlabError(f"{arch} activation {act!r} is not supported (supported: {', '.join(HF_ACTS)})")
    return HF_ACTS[act]


def hf_config(hf: dict, arch: str) -> LlamaConfig:
    """A transformers Llama / Mistral / Qwen2 / Gemma / Mixtral / Qwen2-MoE config.json -> :class:`LlamaConfig`."""
    is_gemma = arch == "GemmaForCausalLM"
    is_qwen2 = arch in ("Qwen2ForCausalLM", QWEN2_MOE)
    if hf.get("mlp_bias"):
        raise GptlabError(f"{arch} with mlp_bias=true is not supported (gptlab's MLP has no biases)")
    if hf.get("attention_bias") and not is_qwen2:
        raise GptlabError(f"{arch} with attention_bias=true (bias on o_proj too) is not supported")
    if is_qwen2 and hf.get("use_sliding_window"):
        raise GptlabError("Qwen2 with use_sliding_window=true (per-layer windows) is not supported")
    act = _hf_activation(hf, arch)
    theta, scaling = _hf_rope(hf)
    n_heads = _require(hf, "num_attention_heads", arch)
    fields = dict(
        vocab_size=_require(hf, "vocab_size", arch),
        context_length=_require(hf, "max_position_embeddings", arch),
        emb_dim=_require(hf, "hidden_size", arch),
        n_layers=_require(hf, "num_hidden_layers", arch),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim"),
        hidden_dim=_require(hf, "intermediate_size", arch),
        tie_embeddings=hf.get("tie_word_embeddings", is_gemma),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=bool(hf.get("qkv_bias", True)) if is_qwen2 else False,  # Qwen2-MoE has the flag, Qwen2 not
        mlp_act=act,
        embed_scale=is_gemma,
        norm_unit_offset=is_gemma,
        sliding_window=hf.get("sliding_window") if arch in ("MistralForCausalLM", MIXTRAL) else None,
        bos_id=hf.get("bos_token_id"),
        eos_id=hf.get("eos_token_id"),
    )
    fields.update(hf_moe_fields(hf, arch))  # n_experts, ... (and the experts' width) for Mixtral / Qwen2-MoE
    return LlamaConfig(**fields)


def _hf_architecture(cfg: LlamaConfig) -> str:
    """The transformers architecture whose fields match ``cfg`` (GptlabError if none does)."""
    if cfg.n_experts:
        return hf_moe_arch(cfg)  # its fields are checked by hf_moe_export
    gemma = (cfg.embed_scale, cfg.norm_unit_offset, cfg.mlp_act)
    if gemma == (True, True, "gelu_tanh"):
        if cfg.qkv_bias or cfg.sliding_window or cfg.rope_scaling:
            raise GptlabError("a Gemma-style config with qkv_bias, sliding_window or rope_scaling has no "
                              "transformers equivalent")
        return "GemmaForCausalLM"
    if cfg.embed_scale or cfg.norm_unit_offset:
        raise GptlabError("embed_scale / norm_unit_offset are only exportable together with mlp_act='gelu_tanh' "
                          "(the Gemma architecture)")
    if cfg.qkv_bias and cfg.sliding_window:
        raise GptlabError("qkv_bias together with sliding_window has no transformers equivalent")
    if cfg.sliding_window:
        return "MistralForCausalLM"
    if cfg.qkv_bias:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


HF_MODEL_TYPES = {QWEN2_MOE: "qwen2_moe"}  # where model_type is not the lower-cased architecture stem


def hf_export(cfg: LlamaConfig) -> tuple[str, dict]:
    """:class:`LlamaConfig` -> (architecture, its transformers config.json)."""
    arch = _hf_architecture(cfg)
    act = "silu" if cfg.mlp_act == "silu" else "gelu_pytorch_tanh"
    out = {
        "architectures": [arch], "model_type": HF_MODEL_TYPES.get(arch, arch.removesuffix("ForCausalLM").lower()),
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length,
        "hidden_size": cfg.emb_dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": act, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
    }
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=False, mlp_bias=False)
    if arch == "GemmaForCausalLM":
        out["hidden_activation"] = act
    if arch == "MistralForCausalLM":
        out["sliding_window"] = cfg.sliding_window
    if arch == "Qwen2ForCausalLM":
        out.update(use_sliding_window=False, sliding_window=None)
    if cfg.rope_scaling:
        out["rope_scaling"] = {"rope_type": "llama3", **cfg.rope_scaling}
    out.update(hf_moe_export(cfg))
    return arch, out


register_family(Family("llama", LlamaConfig, Llama, hf_keys=HF_KEYS, hf_prefix="model.",
                       hf_architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                         "GemmaForCausalLM", MIXTRAL, QWEN2_MOE),
                       hf_config=hf_config, hf_export=hf_export))


# ---- presets: published shapes (from each model's config.json), plus a tiny trainable one ----

_LLAMA3_SCALING = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}

for _name, _cfg in {
    "llama-2-7b": LlamaConfig(vocab_size=32000, context_length=4096, emb_dim=4096, n_layers=32, n_heads=32,
                              hidden_dim=11008, tie_embeddings=False, bos_id=1, eos_id=2),
    "llama-3-8b": LlamaConfig(vocab_size=128256, context_length=8192, emb_dim=4096, n_layers=32, n_heads=32,
                              n_kv_heads=8, hidden_dim=14336, rope_theta=500000.0, tie_embeddings=False,
                              bos_id=128000, eos_id=128001),
    "llama-3.2-1b": LlamaConfig(vocab_size=128256, context_length=131072, emb_dim=2048, n_layers=16, n_heads=32,
                                n_kv_heads=8, hidden_dim=8192, rope_theta=500000.0, rope_scaling=dict(_LLAMA3_SCALING),
                                bos_id=128000, eos_id=128001),
    "llama-3.2-3b": LlamaConfig(vocab_size=128256, context_length=131072, emb_dim=3072, n_layers=28, n_heads=24,
                                n_kv_heads=8, hidden_dim=8192, rope_theta=500000.0, rope_scaling=dict(_LLAMA3_SCALING),
                                bos_id=128000, eos_id=128001),
    "mistral-7b": LlamaConfig(vocab_size=32000, context_length=32768, emb_dim=4096, n_layers=32, n_heads=32,
                              n_kv_heads=8, hidden_dim=14336, sliding_window=4096, tie_embeddings=False,
                              bos_id=1, eos_id=2),
    "mistral-small-24b": LlamaConfig(vocab_size=131072, context_length=32768, emb_dim=5120, n_layers=40,
                                     n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=32768,
                                     rope_theta=100000000.0, tie_embeddings=False, bos_id=1, eos_id=2),
    "gemma-2b": LlamaConfig(vocab_size=256000, context_length=8192, emb_dim=2048, n_layers=18, n_heads=8,
                            n_kv_heads=1, head_dim=256, hidden_dim=16384, norm_eps=1e-6, mlp_act="gelu_tanh",
                            embed_scale=True, norm_unit_offset=True, bos_id=2, eos_id=1),
    "qwen2.5-0.5b": LlamaConfig(vocab_size=151936, context_length=32768, emb_dim=896, n_layers=24, n_heads=14,
                                n_kv_heads=2, hidden_dim=4864, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
                                eos_id=151643),
    "smollm2-135m": LlamaConfig(vocab_size=49152, context_length=8192, emb_dim=576, n_layers=30, n_heads=9,
                                n_kv_heads=3, hidden_dim=1536, rope_theta=100000.0, bos_id=1, eos_id=2),
    "smollm2-360m": LlamaConfig(vocab_size=49152, context_length=8192, emb_dim=960, n_layers=32, n_heads=15,
                                n_kv_heads=5, hidden_dim=2560, rope_theta=100000.0, bos_id=1, eos_id=2),
    "smollm2-1.7b": LlamaConfig(vocab_size=49152, context_length=8192, emb_dim=2048, n_layers=24, n_heads=32,
                                hidden_dim=8192, rope_theta=130000.0, bos_id=1, eos_id=2),
    # Trains on a laptop CPU; vocab_size is replaced by the tokenizer's at train time.
    "llama-micro": LlamaConfig(vocab_size=50257, context_length=128, emb_dim=256, n_layers=4, n_heads=4,
                               n_kv_heads=2, hidden_dim=688),
    "mixtral-8x7b": LlamaConfig(vocab_size=32000, context_length=32768, emb_dim=4096, n_layers=32, n_heads=32,
                                n_kv_heads=8, hidden_dim=14336, rope_theta=1000000.0, tie_embeddings=False,
                                n_experts=8, experts_per_token=2, router_aux_loss_coef=0.02, bos_id=1, eos_id=2),
    # A mixture of experts that trains on a laptop CPU; a Qwen2-MoE shape (4 experts, 2 per token, a shared one),
    # so it exports to transformers and llama.cpp (whose qwen2moe graph does not renormalise the top k).
    "moe-micro": LlamaConfig(vocab_size=50257, context_length=128, emb_dim=192, n_layers=4, n_heads=4,
                             n_kv_heads=2, hidden_dim=256, qkv_bias=True, n_experts=4, experts_per_token=2,
                             norm_topk=False, shared_expert_dim=256, router_aux_loss_coef=0.01),
}.items():
    register_preset(_name, _cfg)
