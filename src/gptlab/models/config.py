"""Typed, validated model configurations and the table of named presets.

A config is the model's only input. Both families share :class:`ModelConfig`
(the fields every tool needs: sizes for parameter counting, KV-cache sizing,
FLOPs); each family adds only the fields it reads.

Legend used across gptlab:
    B  batch size            T  sequence length (tokens)
    V  vocab_size            d  emb_dim
    L  n_layers              H  n_heads          Hkv  n_kv_heads
    hd head_dim              F  hidden_dim (feed-forward width)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gptlab.errors import GptlabError


class ConfigError(GptlabError, ValueError):
    """A model configuration is invalid; the message names the field and the fix."""


@dataclass
class ModelConfig:
    """Fields shared by every family. Derived fields are filled in once, here."""

    family: ClassVar[str] = "base"

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None -> n_heads (plain multi-head attention)
    head_dim: int | None = None  # None -> emb_dim // n_heads
    hidden_dim: int | None = None  # feed-forward width; family default if None
    tie_embeddings: bool = True
    name: str = "custom"

    def __post_init__(self) -> None:
        for f in ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"config field {f}={v!r} must be a positive integer")
        if self.head_dim is None:
            if self.emb_dim % self.n_heads:
                raise ConfigError(
                    f"emb_dim={self.emb_dim} is not divisible by n_heads={self.n_heads}; "
                    "choose sizes that divide or set head_dim explicitly"
                )
            self.head_dim = self.emb_dim // self.n_heads
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )

    # ---- derived sizes, used by inspect, fit and the trainer ----
    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts by group, computed from the config alone."""
        raise NotImplementedError

    @property
    def num_params(self) -> int:
        return self.param_counts()["total"]

    def kv_cache_bytes(self, context: int, batch: int = 1, bytes_per_el: float = 2.0) -> float:
        """Bytes of K and V for `context` tokens: 2 · L · Hkv · hd · T · B · bytes.

        gptlab's cache keeps every token even with a sliding window, so T is not capped here.
        """
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * context * batch * bytes_per_el

    def attended_tokens(self, context: int | None = None) -> int:
        """How many keys one token attends to at ``context``: min(T, W) with a sliding window W (Mistral)."""
        T = self.context_length if context is None else context
        window = getattr(self, "sliding_window", None)  # a field of the families that have one (llama)
        return min(T, window) if window else T

    def flops_per_token(self, context: int | None = None) -> int:
        """Forward FLOPs per token: 2 · (non-embedding params + lm head) + attention scores.

        The attention term (2 · 2 · L · T · H · hd) follows Kaplan et al. 2020 /
        PaLM appendix B with T the attended length: the context, or the sliding
        window if that is shorter (a Mistral token sees only the last W keys).
        """
        c = self.param_counts()
        T = self.attended_tokens(context)
        matmul = 2 * (c["total"] - c["embedding"] + self.vocab_size * self.emb_dim)
        attn = 2 * 2 * self.n_layers * T * self.n_heads * self.head_dim
        return int(matmul + attn)

    # ---- serialisation ----
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["family"] = self.family
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ModelConfig":
        """Build the right family's config from a dict with a ``family`` key."""
        d = dict(d)
        fam = d.pop("family", "gpt2")
        _load_family_presets()  # registers families defined in other modules (llama)
        cls = FAMILIES.get(fam)
        if cls is None:
            raise ConfigError(f"unknown model family {fam!r}; known: {', '.join(sorted(FAMILIES))}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown {fam} config field(s): {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (derived fields recomputed if not given)."""
        d = dataclasses.asdict(self)
        # Fields derived from the ones being changed are recomputed unless given.
        if {"emb_dim", "n_heads"} & changes.keys():
            d["head_dim"] = None
        if "n_heads" in changes and self.n_kv_heads == self.n_heads:
            d["n_kv_heads"] = None
        if "emb_dim" in changes:
            d["hidden_dim"] = None
        d.update(changes)
        return type(self)(**d)


@dataclass
class GPT2Config(ModelConfig):
    """GPT-2: learned positions, pre-LN LayerNorm blocks, GELU(tanh) 4x MLP."""

    family: ClassVar[str] = "gpt2"

    drop_rate: float = 0.0
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    attn_impl: str = "sdpa"  # "sdpa" | "math" (the explicit masked softmax the course teaches)

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


FAMILIES: dict[str, type[ModelConfig]] = {"gpt2": GPT2Config}


def register_family(cls: type[ModelConfig]) -> type[ModelConfig]:
    """Class decorator: make a family's config buildable by ``ModelConfig.from_dict``."""
    FAMILIES[cls.family] = cls
    return cls


# ---- presets: published shapes, plus small ones that train on a laptop CPU ----
PRESETS: dict[str, ModelConfig] = {}


def register_preset(name: str, cfg: ModelConfig) -> None:
    """Add ``cfg`` to the preset table under ``name`` (families call this on import)."""
    cfg.name = name
    PRESETS[name] = cfg


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


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset (so callers may modify it)."""
    _load_family_presets()
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return ModelConfig.from_dict(PRESETS[name].to_dict())


def list_presets() -> list[str]:
    """Names of every preset, all families included."""
    _load_family_presets()
    return sorted(PRESETS)


def _load_family_presets() -> None:
    # Other families register their presets on import; import them lazily here.
    try:
        from gptlab.models import llama  # noqa: F401
    except ImportError:
        pass
