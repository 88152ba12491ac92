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
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from gptlab.errors import GptlabError


class ConfigError(GptlabError, ValueError):
    """A model configuration is invalid; the message names the field and the fix."""


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type ``hint`` (int, float, bool, str, dict, list[X], unions)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is float:  # an int is a fine float; a bool is neither
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is Any:
        return True
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("NoneType", "None").replace("<class '", "").replace("'>", "")


def check_field_types(cfg: Any) -> None:
    """Refuse a config field whose value is not of its annotated type, naming the field (e.g. from a damaged
    config.json: ``rope_theta=None``, ``n_layers="12"``)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not _fits(value, hints[f.name]):
            raise ConfigError(f"config field {f.name}={value!r} must be {_describe(hints[f.name])}")


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
        check_field_types(self)
        for f in ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"config field {f}={v!r} must be a positive integer")
        for f in ("head_dim", "n_kv_heads", "hidden_dim"):  # optional: None means derived
            v = getattr(self, f, None)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"config field {f}={v!r} must be a positive integer (or omitted)")
        if self.head_dim is None:
            if self.emb_dim % self.n_heads:
                near = sorted((h for h in range(1, self.emb_dim + 1) if self.emb_dim % h == 0),
                              key=lambda h: (abs(h - self.n_heads), h))[:2]
                raise ConfigError(
                    f"emb_dim={self.emb_dim} is not divisible by n_heads={self.n_heads}; choose n_heads that "
                    f"divides it (e.g. {' or '.join(map(str, sorted(near)))}), or another emb_dim"
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
        """Exact parameter counts by group, computed from the config alone.

        Keys: ``total``, ``embedding`` (input lookup tables), ``non_embedding``,
        ``lm_head`` (V·d, read in full by every token even when tied), ``tied``,
        ``per_block``; a mixture-of-experts config adds ``active`` (the
        parameters one token uses), which defaults to ``total``.
        """
        raise NotImplementedError

    @property
    def num_params(self) -> int:
        return self.param_counts()["total"]

    def active_params(self) -> int:
        """Parameters one token uses: ``total``, or fewer for a mixture of experts (k of E experts)."""
        c = self.param_counts()
        return c.get("active", c["total"])

    def cached_tokens(self, context: int, windowed: bool = False) -> int:
        """Tokens whose K and V a cache holds at ``context``: all of them, or min(T, W) when ``windowed``.

        A plain KVCache keeps every token even with a sliding window (its decode
        reads only the last W: ``attended_tokens``); an engine that keeps a ring
        of the last W tokens (gptlab's engine, llama.cpp) passes ``windowed=True``.
        """
        return self.attended_tokens(context) if windowed else context

    def kv_cache_bytes(self, context: int, batch: int = 1, bytes_per_el: float = 2.0,
                       windowed: bool = False) -> float:
        """Bytes of K and V for `context` tokens: 2 · L · Hkv · hd · T · B · bytes, T = ``cached_tokens``.

        The default is a cache of every token (a plain KVCache), also with a
        sliding window; ``windowed=True`` caps T at the window (the engine's ring cache).
        """
        T = self.cached_tokens(context, windowed)
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * T * batch * bytes_per_el

    def attended_tokens(self, context: int | None = None) -> int:
        """How many keys one token attends to at ``context``: min(T, W) with a sliding window W (Mistral)."""
        T = self.context_length if context is None else context
        window = getattr(self, "sliding_window", None)  # a field of the families that have one (llama)
        return min(T, window) if window else T

    def flops_per_token(self, context: int | None = None) -> int:
        """Forward FLOPs per token: 2 · (active non-embedding params + lm head) + attention scores.

        The attention term (2 · 2 · L · T · H · hd) follows Kaplan et al. 2020 /
        PaLM appendix B with T the attended length: the context, or the sliding
        window if that is shorter (a Mistral token sees only the last W keys).
        A mixture of experts counts its active parameters (k of E experts).
        """
        c = self.param_counts()
        T = self.attended_tokens(context)
        matmul = 2 * (c.get("active", c["total"]) - c["embedding"] + self.vocab_size * self.emb_dim)
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
        cls = get_family(fam).config
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


@dataclass(frozen=True)
class KeyRule:
    """One row of a declarative key map: our state-dict name <-> a checkpoint's name.

    ``{i}`` stands for the layer index, ``{e}`` for the expert index of a
    mixture of experts (``cfg.n_experts``); ``transpose`` marks tensors stored as
    (in, out) (GPT-2's Conv1D); ``when(cfg)`` makes a row conditional on the config.
    A row with ``{e}`` in ``ours`` only maps every expert to one stored tensor that
    stacks them along its first dimension (GGUF's ``ffn_*_exps``): expansion sets
    ``index`` = e, and the row's tensor is ``stored[index]``.
    """

    ours: str
    theirs: str
    transpose: bool = False
    when: Callable[[ModelConfig], bool] | None = None
    index: int | None = None


@dataclass(frozen=True)
class Family:
    """Everything gptlab knows about one model family, registered by the family's own file.

    Loaders, exporters, ``inspect`` and ``fit`` look a family up here by name
    (``cfg.family``) or by Hugging Face architecture; nothing else branches on it.
    """

    name: str
    config: type[ModelConfig]
    model: type  # a gptlab.models.base.LanguageModel subclass
    hf_keys: tuple[KeyRule, ...] = ()  # our names <-> transformers' names
    hf_prefix: str = ""  # the base model's key prefix (``transformer.`` / ``model.``), absent in bare checkpoints
    hf_architectures: tuple[str, ...] = ()  # config.json ``architectures`` this family loads
    hf_config: Callable[[dict, str], ModelConfig] | None = None  # HF config.json (+ architecture) -> our config
    hf_export: Callable[[ModelConfig], tuple[str, dict]] | None = None  # our config -> (architecture, config.json)


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make ``family`` known to ``ModelConfig.from_dict``, the loaders and the exporters."""
    if family.config.family != family.name:
        raise ConfigError(f"family {family.name!r}: its config class says family={family.config.family!r}")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    """The registered :class:`Family` called ``name`` (the ``family`` of a config)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def family_for_architecture(arch: str) -> Family | None:
    """The family that loads Hugging Face architecture ``arch`` (e.g. ``LlamaForCausalLM``), or None."""
    return next((f for f in FAMILIES.values() if arch in f.hf_architectures), None)


# ---- presets: published shapes, plus small ones that train on a laptop CPU ----
PRESETS: dict[str, ModelConfig] = {}


def register_preset(name: str, cfg: ModelConfig) -> None:
    """Add ``cfg`` to the preset table under ``name`` (families call this on import)."""
    cfg.name = name
    PRESETS[name] = cfg


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset (so callers may modify it)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return ModelConfig.from_dict(PRESETS[name].to_dict())


def list_presets() -> list[str]:
    """Names of every preset, all families included."""
    return sorted(PRESETS)
