"""The mixture-of-experts feed-forward of the Llama family (Mixtral, Qwen2-MoE), and what it needs around it.

A sparse MoE layer replaces the gated MLP: a linear router scores E experts
per token, the top k of them run, and their outputs are summed with the
router's softmax weights (renormalised over the k when ``norm_topk``):

    p = softmax(router(x))                 (N, E)   N = B·T tokens
    w, idx = top_k(p)                      (N, k)   w /= sum(w) when norm_topk (Mixtral: yes; Qwen2-MoE: a field)
    y = sum_j w_j · expert_{idx_j}(x)      (N, d)
    y += sigmoid(shared_gate(x)) · shared_expert(x)    only with a shared expert (Qwen2-MoE)

Shazeer et al. 2017 (https://arxiv.org/abs/1701.06538), Mixtral (https://arxiv.org/abs/2401.04088).
Each expert is a gated MLP of width ``hidden_dim`` built by the family (``GatedMLP``), so
quantization and LoRA see ordinary linear layers, and checkpoint names stay 1:1 with
Hugging Face's (``experts.{e}.gate_proj``).

The load-balancing loss (Switch Transformer, https://arxiv.org/abs/2101.03961, eq. 4-6) is

    aux = E · sum_e f_e · P_e,   f_e = top-k assignments to e / tokens,   P_e = mean router probability of e,

with f and P averaged over every MoE layer of the forward pass, exactly as
transformers' ``load_balancing_loss_func`` does. Each layer keeps its
per-forward statistics; the model combines them (:func:`balance_loss`) and
the training loop adds ``router_aux_loss_coef`` times it to the loss.

This file also holds the MoE rows of the family's Hugging Face key map and the
config.json translation of the MoE fields, so ``llama.py`` stays one readable file.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.models.config import ConfigError, KeyRule, ModelConfig

# ``cfg`` below is a LlamaConfig (models/llama.py, which imports this file): its MoE fields are
# n_experts, experts_per_token, norm_topk, shared_expert_dim, router_aux_loss_coef.

MIXTRAL, QWEN2_MOE = "MixtralForCausalLM", "Qwen2MoeForCausalLM"


# ---- config: validation and sizes (called by LlamaConfig) ----

def check_moe_fields(cfg: ModelConfig) -> None:
    """Refuse MoE fields that cannot work, naming the field and the fix."""
    if cfg.n_experts < 0:
        raise ConfigError(f"n_experts={cfg.n_experts} must be >= 0 (0: a dense MLP)")
    if not cfg.n_experts:
        if cfg.experts_per_token or cfg.shared_expert_dim is not None:
            raise ConfigError("experts_per_token / shared_expert_dim need n_experts > 0 (a mixture of experts)")
        return
    if not 1 <= cfg.experts_per_token <= cfg.n_experts:
        raise ConfigError(f"experts_per_token={cfg.experts_per_token} must be between 1 and "
                          f"n_experts={cfg.n_experts} (Mixtral: 2 of 8)")
    if cfg.shared_expert_dim is not None and cfg.shared_expert_dim < 1:
        raise ConfigError(f"shared_expert_dim={cfg.shared_expert_dim} must be >= 1 (or None: no shared expert)")
    if cfg.router_aux_loss_coef < 0:
        raise ConfigError(f"router_aux_loss_coef={cfg.router_aux_loss_coef} must be >= 0 (0 turns the "
                          "load-balancing loss off)")


def mlp_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters of one layer's feed-forward: the active count runs k of E experts."""
    d, F_ = cfg.emb_dim, cfg.hidden_dim
    if not cfg.n_experts:
        return 3 * d * F_, 3 * d * F_
    router = d * cfg.n_experts
    shared = 3 * d * cfg.shared_expert_dim + d if cfg.shared_expert_dim else 0  # + its (1, d) sigmoid gate
    return (router + cfg.n_experts * 3 * d * F_ + shared,
            router + cfg.experts_per_token * 3 * d * F_ + shared)


# ---- the layer ----

class SparseMoE(nn.Module):
    """Top-k routed experts (+ an optional gated shared expert): a drop-in for the gated MLP.

    ``make_mlp(cfg, width)`` builds one gated MLP (the family's ``GatedMLP``).
    After each call, ``stats`` holds this layer's (assignments per expert (E,),
    summed router probabilities (E,), tokens) for :func:`balance_loss`.
    """

    def __init__(self, cfg: ModelConfig, make_mlp: Callable[[ModelConfig, int], nn.Module]):
        super().__init__()
        self.n_experts, self.k, self.norm_topk = cfg.n_experts, cfg.experts_per_token, cfg.norm_topk
        self.gate = nn.Linear(cfg.emb_dim, cfg.n_experts, bias=False)  # the router
        self.experts = nn.ModuleList(make_mlp(cfg, cfg.hidden_dim) for _ in range(cfg.n_experts))
        self.shared_expert = make_mlp(cfg, cfg.shared_expert_dim) if cfg.shared_expert_dim else None
        self.shared_expert_gate = nn.Linear(cfg.emb_dim, 1, bias=False) if cfg.shared_expert_dim else None
        self.stats: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = x.reshape(B * T, d)  # (N, d)
        probs = F.softmax(self.gate(h), dim=-1, dtype=torch.float32)  # (N, E), fp32 as in the references
        weights, chosen = torch.topk(probs, self.k, dim=-1)  # (N, k) each
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        counts = torch.bincount(chosen.flatten(), minlength=self.n_experts)  # (E,) assignments
        self.stats = (counts.float(), probs.sum(0), B * T)
        out = torch.zeros_like(h)  # (N, d)
        for e in torch.nonzero(counts).flatten().tolist():  # only the experts some token chose
            token, slot = torch.where(chosen == e)  # (n_e,) each
            y = self.experts[e](h[token]) * weights[token, slot, None]  # (n_e, d)
            out.index_add_(0, token, y)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
        return out.view(B, T, d)


def balance_loss(layers: list[SparseMoE]) -> torch.Tensor | None:
    """The load-balancing loss E · sum_e f_e · P_e over the MoE layers' last forward (None before any)."""
    stats = [m.stats for m in layers if m.stats is not None]
    if not stats:
        return None
    tokens = sum(n for _, _, n in stats)
    f = torch.stack([c for c, _, _ in stats]).sum(0) / tokens  # (E,): assignments per token (sums to k)
    P = torch.stack([p for _, p, _ in stats]).sum(0) / tokens  # (E,): mean router probability
    return layers[0].n_experts * (f * P).sum()


# ---- Hugging Face: key-map rows and config.json fields ----

def hf_moe_arch(cfg: ModelConfig) -> str | None:
    """Whose checkpoint names a MoE config uses: Mixtral's (no q/k/v bias, no shared expert) or Qwen2-MoE's."""
    if not cfg.n_experts:
        return None
    return MIXTRAL if not cfg.qkv_bias and cfg.shared_expert_dim is None else QWEN2_MOE


def _is(arch: str) -> Callable:
    return lambda cfg: hf_moe_arch(cfg) == arch


_EXPERT = "layers.{i}.mlp.experts.{e}."
HF_MOE_KEYS: tuple[KeyRule, ...] = (
    # Mixtral: block_sparse_moe.{gate, experts.E.w1 (gate), w3 (up), w2 (down)}
    KeyRule("layers.{i}.mlp.gate.weight", "model.layers.{i}.block_sparse_moe.gate.weight", when=_is(MIXTRAL)),
    KeyRule(_EXPERT + "gate_proj.weight", "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", when=_is(MIXTRAL)),
    KeyRule(_EXPERT + "up_proj.weight", "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", when=_is(MIXTRAL)),
    KeyRule(_EXPERT + "down_proj.weight", "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", when=_is(MIXTRAL)),
    # Qwen2-MoE: our own names (mlp.gate, mlp.experts.E.*, mlp.shared_expert.*, mlp.shared_expert_gate)
    KeyRule("layers.{i}.mlp.gate.weight", "model.layers.{i}.mlp.gate.weight", when=_is(QWEN2_MOE)),
    *(KeyRule(_EXPERT + f"{p}.weight", f"model.layers.{{i}}.mlp.experts.{{e}}.{p}.weight", when=_is(QWEN2_MOE))
      for p in ("gate_proj", "up_proj", "down_proj")),
    *(KeyRule(f"layers.{{i}}.mlp.{p}.weight", f"model.layers.{{i}}.mlp.{p}.weight",
              when=lambda cfg: _is(QWEN2_MOE)(cfg) and bool(cfg.shared_expert_dim))
      for p in ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj", "shared_expert_gate")),
)


def hf_moe_fields(hf: dict, arch: str) -> dict:
    """The MoE fields of :class:`LlamaConfig` from a Mixtral / Qwen2-MoE config.json ({} for a dense one)."""
    if arch == MIXTRAL:
        return dict(n_experts=hf["num_local_experts"], experts_per_token=hf["num_experts_per_tok"], norm_topk=True,
                    router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0))
    if arch != QWEN2_MOE:
        return {}
    step, dense = hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
    if step != 1 or dense:
        raise GptlabError(f"Qwen2-MoE with dense layers (decoder_sparse_step={step}, mlp_only_layers={dense}) "
                          "is not supported; gptlab's MoE config makes every layer sparse")
    shared = hf.get("shared_expert_intermediate_size") or None
    if not shared and not hf.get("qkv_bias", True):
        raise GptlabError("Qwen2-MoE without a shared expert and without q/k/v biases is not supported")
    return dict(n_experts=hf["num_experts"], experts_per_token=hf["num_experts_per_tok"],
                hidden_dim=hf.get("moe_intermediate_size") or hf["intermediate_size"],
                shared_expert_dim=shared, norm_topk=bool(hf.get("norm_topk_prob", False)),
                router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0))


def hf_moe_export(cfg: ModelConfig) -> dict:
    """The config.json fields of a MoE config ({} for a dense one); GptlabError when transformers has no match."""
    arch = hf_moe_arch(cfg)
    if arch is None:
        return {}
    if cfg.embed_scale or cfg.norm_unit_offset or cfg.mlp_act != "silu" or cfg.rope_scaling:
        raise GptlabError("a mixture of experts with Gemma-style fields (embed_scale, norm_unit_offset, "
                          "gelu_tanh) or rope_scaling has no transformers equivalent")
    common = {"num_experts_per_tok": cfg.experts_per_token, "router_aux_loss_coef": cfg.router_aux_loss_coef,
              "output_router_logits": False}
    if arch == MIXTRAL:
        if not cfg.norm_topk:
            raise GptlabError("Mixtral always renormalises its top-k weights; a config with norm_topk=False and "
                              "no shared expert has no transformers equivalent")
        return {**common, "num_local_experts": cfg.n_experts, "router_jitter_noise": 0.0,
                "sliding_window": cfg.sliding_window}
    if not cfg.qkv_bias or not cfg.shared_expert_dim or cfg.sliding_window:
        raise GptlabError("a mixture of experts with a shared expert exports as Qwen2-MoE, which needs "
                          "qkv_bias=True, a shared expert and no sliding window")
    return {**common, "num_experts": cfg.n_experts, "moe_intermediate_size": cfg.hidden_dim,
            "shared_expert_intermediate_size": cfg.shared_expert_dim, "norm_topk_prob": cfg.norm_topk,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "qkv_bias": True,
            "use_sliding_window": False, "sliding_window": None}
