"""The declarative GGUF tables: tensor names and hyperparameter keys, per llama.cpp architecture.

``weights/gguf.py`` reads files through them, ``weights/gguf_export.py`` writes
files through them (read the other way), so a name or key is spelled once.

    GGUF_KEYS / GPT2_GGUF_KEYS   our state-dict names <-> llama.cpp's tensor names (KeyRule rows,
                                 the dialect of weights/keymaps.py; {i} is the layer)
    GGUF_ARCHS                   general.architecture -> (gptlab family, its tensor table)
    GGUF_META                    config field <-> metadata key {arch}.KEY, with its type and default
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from gptlab.models.config import KeyRule

# GGUF tensor names <-> ours, in the one key-map dialect (weights/keymaps.py). The names are llama.cpp's
# (one vocabulary for every family), so the tables live with the format rather than in a Family.
GGUF_KEYS: tuple[KeyRule, ...] = (
    KeyRule("embed_tokens.weight", "token_embd.weight"),
    KeyRule("layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    KeyRule("layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    KeyRule("layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    KeyRule("layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    KeyRule("layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias", when=lambda cfg: cfg.qkv_bias),
    KeyRule("layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias", when=lambda cfg: cfg.qkv_bias),
    KeyRule("layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias", when=lambda cfg: cfg.qkv_bias),
    KeyRule("layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    KeyRule("layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    KeyRule("layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", when=lambda cfg: not cfg.n_experts),
    KeyRule("layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", when=lambda cfg: not cfg.n_experts),
    KeyRule("layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", when=lambda cfg: not cfg.n_experts),
    # a mixture of experts: {e} in our name only = one stored tensor stacking every expert (weights/keymaps.py)
    KeyRule("layers.{i}.mlp.gate.weight", "blk.{i}.ffn_gate_inp.weight", when=lambda cfg: cfg.n_experts > 0),
    *(KeyRule(f"layers.{{i}}.mlp.experts.{{e}}.{p}_proj.weight", f"blk.{{i}}.ffn_{p}_exps.weight",
              when=lambda cfg: cfg.n_experts > 0) for p in ("gate", "up", "down")),
    *(KeyRule(f"layers.{{i}}.mlp.shared_expert.{p}_proj.weight", f"blk.{{i}}.ffn_{p}_shexp.weight",
              when=lambda cfg: bool(cfg.shared_expert_dim)) for p in ("gate", "up", "down")),
    KeyRule("layers.{i}.mlp.shared_expert_gate.weight", "blk.{i}.ffn_gate_inp_shexp.weight",
            when=lambda cfg: bool(cfg.shared_expert_dim)),
    KeyRule("norm.weight", "output_norm.weight"),
    KeyRule("lm_head.weight", "output.weight", when=lambda cfg: not cfg.tie_embeddings),
)

GPT2_GGUF_KEYS: tuple[KeyRule, ...] = (
    KeyRule("tok_emb.weight", "token_embd.weight"),
    KeyRule("pos_emb.weight", "position_embd.weight"),
    KeyRule("blocks.{i}.norm1.weight", "blk.{i}.attn_norm.weight"),
    KeyRule("blocks.{i}.norm1.bias", "blk.{i}.attn_norm.bias"),
    KeyRule("blocks.{i}.attn.qkv.weight", "blk.{i}.attn_qkv.weight"),  # nn.Linear rows: no transpose
    KeyRule("blocks.{i}.attn.qkv.bias", "blk.{i}.attn_qkv.bias", when=lambda cfg: cfg.qkv_bias),
    KeyRule("blocks.{i}.attn.proj.weight", "blk.{i}.attn_output.weight"),
    KeyRule("blocks.{i}.attn.proj.bias", "blk.{i}.attn_output.bias"),
    KeyRule("blocks.{i}.norm2.weight", "blk.{i}.ffn_norm.weight"),
    KeyRule("blocks.{i}.norm2.bias", "blk.{i}.ffn_norm.bias"),
    KeyRule("blocks.{i}.mlp.fc.weight", "blk.{i}.ffn_up.weight"),
    KeyRule("blocks.{i}.mlp.fc.bias", "blk.{i}.ffn_up.bias"),
    KeyRule("blocks.{i}.mlp.proj.weight", "blk.{i}.ffn_down.weight"),
    KeyRule("blocks.{i}.mlp.proj.bias", "blk.{i}.ffn_down.bias"),
    KeyRule("final_norm.weight", "output_norm.weight"),
    KeyRule("final_norm.bias", "output_norm.bias"),
    KeyRule("out_head.weight", "output.weight", when=lambda cfg: not cfg.tie_embeddings),
)
# general.architecture -> (gptlab family, tensor table)
GGUF_ARCHS: dict[str, tuple[str, tuple[KeyRule, ...]]] = {
    "llama": ("llama", GGUF_KEYS), "qwen2": ("llama", GGUF_KEYS), "qwen2moe": ("llama", GGUF_KEYS),
    "gpt2": ("gpt2", GPT2_GGUF_KEYS)}


@dataclasses.dataclass(frozen=True)
class MetaKey:
    """One hyperparameter: our config field <-> the GGUF key ``{arch}.{key}``.

    ``default``: REQUIRED (a file without it is refused), OPTIONAL (absent: the
    config derives it, e.g. n_kv_heads = n_heads), or the value to assume.
    """

    ours: str
    key: str
    cast: type = int
    default: Any = "required"


REQUIRED, OPTIONAL = "required", "optional"


def f32_value(v: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-5, not 9.99999974738e-06),
    so a config written as float32 reads back as the value it was written from."""
    return float(str(np.float32(v)))


_SHAPE_KEYS = (MetaKey("context_length", "context_length"), MetaKey("emb_dim", "embedding_length"),
               MetaKey("n_layers", "block_count"), MetaKey("n_heads", "attention.head_count"),
               MetaKey("hidden_dim", "feed_forward_length"))
_LLAMA_META = _SHAPE_KEYS + (
    MetaKey("n_kv_heads", "attention.head_count_kv", int, OPTIONAL),
    MetaKey("head_dim", "attention.key_length", int, OPTIONAL),
    MetaKey("rope_theta", "rope.freq_base", f32_value, 10000.0),
    MetaKey("norm_eps", "attention.layer_norm_rms_epsilon", f32_value))
GGUF_META: dict[str, tuple[MetaKey, ...]] = {
    "llama": _LLAMA_META, "qwen2": _LLAMA_META, "qwen2moe": _LLAMA_META,
    "gpt2": _SHAPE_KEYS + (MetaKey("norm_eps", "attention.layer_norm_epsilon", f32_value),)}

# Architectures whose q/k rows llama.cpp's converter permutes (it uses the
# interleaved-pairs RoPE layout; Hugging Face checkpoints use "rotate half").
PERMUTED_ARCHS = {"llama"}
SUPPORTED_ARCHS = set(GGUF_ARCHS)
# llama.cpp's MoE graph renormalises the top-k router weights for these (Mixtral), not for qwen2moe,
# unless the file says otherwise ({arch}.expert_weights_norm).
NORM_TOPK_ARCHS = {"llama"}
# Tensors that describe the model but are not parameters.
NON_PARAMETERS = {"rope_freqs.weight"}
