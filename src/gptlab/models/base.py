"""The one interface every model family implements.

Loaders, model surgery, LoRA, quantization and the inference engine reach a
model's parts through these methods, never through attribute names or
``hasattr`` probes. A family subclasses :class:`LanguageModel`, names its four
parts in class attributes (so state-dict keys stay the checkpoint-style names
each family uses) and writes ``features``; the rest is shared.

    ids (B, T) --embedding--> x (B, T, d) --blocks--> --final norm--> h (B, T, d) --head--> logits (B, T, V)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.models.attention import CacheView, KVCache, SlotCache
from gptlab.models.config import ModelConfig


@dataclass
class ClassifierInfo:
    """What a classifier's head means (``gptlab finetune classify``): one output per label.

    Saved as the ``"classifier"`` entry of a model directory's config.json.
    """

    labels: list[str]
    max_length: int  # inputs are cropped (and padded) to this many tokens
    pad_id: int
    base_model: str = ""  # the model it was fine-tuned from
    trainable: str = ""  # the freezing policy it was trained with

    def to_dict(self) -> dict[str, Any]:
        """The config.json entry."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClassifierInfo":
        """Read the config.json entry (unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as e:
            raise GptlabError(f"the 'classifier' entry of config.json is incomplete ({e})") from None


@dataclass
class LoraConfig:
    """LoRA settings: rank, alpha, dropout and which linear layers get adapters (``finetune/lora.py``).

    ``targets``: module short names (the last part of the name, e.g. ``q_proj``,
    ``v_proj`` for Llama, ``qkv``, ``fc`` for GPT-2) or ``"all-linear"``: every
    linear layer inside the transformer blocks (the head is left alone).
    Saved as the ``"lora"`` entry of the config.json of a model with unmerged adapters.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["all-linear"])

    def validate(self) -> None:
        if self.rank < 1:
            raise GptlabError(f"LoRA rank={self.rank} must be >= 1")
        if self.alpha <= 0:
            raise GptlabError(f"LoRA alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise GptlabError(f"LoRA dropout={self.dropout} must be in [0, 1)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LanguageModel(nn.Module):
    """A decoder-only language model: ``model(ids, cache=None) -> logits``.

    Subclasses set the attribute names of their parts and implement
    :meth:`features`; ``cfg`` is the model's only input.
    """

    EMBEDDING: ClassVar[str]  # the token embedding nn.Embedding (V -> d)
    BLOCKS: ClassVar[str]  # the nn.ModuleList of cfg.n_layers transformer blocks
    FINAL_NORM: ClassVar[str]  # the norm between the last block and the head
    HEAD: ClassVar[str]  # the output projection (d -> V, or d -> n_classes for a classifier)

    cfg: ModelConfig
    # What a checkpoint of this model records besides its config (weights/native.py saves and restores them):
    classifier: ClassifierInfo | None = None  # set when the head was replaced by a classifier's
    lora: LoraConfig | None = None  # set while the model carries unmerged LoRA adapters (finetune/lora.py)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg

    # ---- the parts ----
    def get_embedding(self) -> nn.Embedding:
        """The token embedding (V, d)."""
        return getattr(self, self.EMBEDDING)

    def set_embedding(self, embedding: nn.Module) -> None:
        """Replace the token embedding (e.g. by an int8 table shared with a quantized head)."""
        setattr(self, self.EMBEDDING, embedding)

    def get_blocks(self) -> nn.ModuleList:
        """The transformer blocks, first to last."""
        return getattr(self, self.BLOCKS)

    def get_final_norm(self) -> nn.Module:
        """The norm applied to the last block's output."""
        return getattr(self, self.FINAL_NORM)

    def get_head(self) -> nn.Module:
        """The output head (an ``nn.Linear`` unless quantized or wrapped by LoRA)."""
        return getattr(self, self.HEAD)

    def set_head(self, head: nn.Module) -> None:
        """Replace the output head (e.g. by a classifier's d -> n_classes layer)."""
        setattr(self, self.HEAD, head)

    @classmethod
    def head_key(cls) -> str:
        """State-dict key of the head's weight (``out_head.weight``, ``lm_head.weight``)."""
        return f"{cls.HEAD}.weight"

    @classmethod
    def embedding_key(cls) -> str:
        """State-dict key of the token embedding's weight."""
        return f"{cls.EMBEDDING}.weight"

    # ---- what loaders call after filling the weights ----
    def tie_weights(self) -> None:
        """Share the head's weight with the token embedding when ``cfg.tie_embeddings``."""
        if self.cfg.tie_embeddings:
            self.get_head().weight = self.get_embedding().weight

    def reset_buffers(self) -> None:
        """Recompute buffers derived from the config (none by default; RoPE tables in Llama)."""

    def finish_loading(self) -> None:
        """After weights were assigned onto a meta-device model: rebuild derived buffers, then tie."""
        self.reset_buffers()
        self.tie_weights()

    # ---- running ----
    def features(self, ids: torch.Tensor, cache: CacheView | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, d), before the output head.

        ``cache``: a :class:`KVCache` (rows share one position, advanced by the
        call) or a :class:`SlotBatch` (``SlotCache.rows(slots, positions)``:
        each row at the positions its caller gives).
        """
        raise NotImplementedError

    def forward(self, ids: torch.Tensor, cache: CacheView | None = None) -> torch.Tensor:
        return self.get_head()(self.features(ids, cache))  # (B, T, V)

    def aux_loss(self) -> torch.Tensor | None:
        """An auxiliary training loss of the last forward call, already weighted, or None.

        A mixture of experts returns its weighted load-balancing loss; the
        training loop's language-modeling task adds it to the cross-entropy.
        """
        return None

    def new_cache(self, batch: int, max_len: int | None = None, *, dtype=None, device=None) -> KVCache:
        """An empty KV cache sized for this model (default: its full context)."""
        p = self.get_final_norm().weight  # the activations' dtype (the embedding may be an int8 table)
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_kv_heads, max_len or self.cfg.context_length,
                       self.cfg.head_dim, dtype=dtype or p.dtype, device=device or p.device)

    def new_slot_cache(self, max_batch: int, max_len: int | None = None, *, dtype=None,
                       device=None, spare: bool = False) -> SlotCache:
        """An empty slot cache: ``max_batch`` independent sequences of up to ``max_len`` tokens (default: the context).

        With a sliding window W < max_len the cache keeps a ring of each sequence's last W tokens.
        ``spare``: one more index per slot for a :class:`~gptlab.models.attention.StaticBatch` (a captured
        decode step); not with a ring (the cache's ``spare`` says whether it has one).
        """
        p = self.get_final_norm().weight  # the activations' dtype (the embedding may be an int8 table)
        max_len = min(max_len or self.cfg.context_length, self.cfg.context_length)
        window = self.cfg.attended_tokens(max_len)  # < max_len for a sliding window: keep a ring of W
        return SlotCache(self.cfg.n_layers, max_batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim,
                         dtype=dtype or p.dtype, device=device or p.device,
                         ring=window if window < max_len else None, spare=spare and window >= max_len)

    def positions(self, T: int, cache: CacheView | None, device) -> torch.Tensor:
        """Absolute positions of a call's T new tokens, checked against the context window.

        (T,) without a cache or with a :class:`KVCache`; (B, T) from a :class:`SlotBatch`.
        """
        end = cache.end(T) if cache is not None else T
        if end > self.cfg.context_length:  # a forward pass past the context window
            raise ValueError(
                f"sequence of {end} tokens exceeds context_length {self.cfg.context_length}; "
                "crop the input (generate() does this) or use a model with a longer context"
            )
        return cache.positions(T, device) if cache is not None else torch.arange(T, device=device)
