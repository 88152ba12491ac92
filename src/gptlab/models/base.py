"""The one interface every model family implements.

Loaders, model surgery, LoRA, quantization and the inference engine reach a
model's parts through these methods, never through attribute names or
``hasattr`` probes. A family subclasses :class:`LanguageModel`, names its four
parts in class attributes (so state-dict keys stay the checkpoint-style names
each family uses) and writes ``features``; the rest is shared.

    ids (B, T) --embedding--> x (B, T, d) --blocks--> --final norm--> h (B, T, d) --head--> logits (B, T, V)
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from gptlab.models.attention import KVCache
from gptlab.models.config import ModelConfig


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

    # ---- the parts ----
    def get_embedding(self) -> nn.Embedding:
        """The token embedding (V, d)."""
        return getattr(self, self.EMBEDDING)

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
    def features(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, d), before the output head."""
        raise NotImplementedError

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.get_head()(self.features(ids, cache))  # (B, T, V)

    def new_cache(self, batch: int, max_len: int | None = None, *, dtype=None, device=None) -> KVCache:
        """An empty KV cache sized for this model (default: its full context)."""
        p = self.get_embedding().weight
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_kv_heads, max_len or self.cfg.context_length,
                       self.cfg.head_dim, dtype=dtype or p.dtype, device=device or p.device)

    def check_length(self, start: int, T: int) -> None:
        """Refuse a forward pass that would run past the context window."""
        if start + T > self.cfg.context_length:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds context_length {self.cfg.context_length}; "
                "crop the input (generate() does this) or use a model with a longer context"
            )
