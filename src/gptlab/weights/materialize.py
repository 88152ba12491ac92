"""The one load path: a reader's config + tensors -> a finished model.

Every checkpoint format (``weights/native.py``, ``weights/hf.py``,
``weights/gguf.py``) only reads: its config, and a :class:`Tensors` source
that names its tensors, gives their shapes from headers, and produces one tensor
at a time. :func:`materialize` does the rest, the same way for all of them:

    empty model on the meta device (no memory)
    -> prepare(model)            optional: a classifier's head, unmerged LoRA adapters
    -> check_strict              every missing / unexpected / mis-shaped key named
    -> one tensor at a time:     read (dequantize, cast), transpose, move, assign
    -> model.finish_loading()    derived buffers (RoPE tables), then weight tying -- once
    -> .eval()

Reading one tensor at a time keeps peak memory at about the final model plus
one tensor (a GGUF reader reads each tensor from the file, mapping none of it;
a safetensors reader hands out zero-copy views of the memory-mapped file).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.models import empty_model
from gptlab.models.base import LanguageModel
from gptlab.models.config import KeyRule, ModelConfig
from gptlab.weights.keymaps import check_strict


class Tensors(Protocol):
    """What a checkpoint reader hands to :func:`materialize`."""

    source: str  # the file or directory, for messages
    by: str  # whose names errors use: "checkpoint" (a foreign format) or "model" (ours)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Stored key -> shape, from headers only."""

    def rules(self, model: nn.Module) -> tuple[list[KeyRule], Callable[[str], bool]]:
        """The expanded key map (ours <-> stored) for ``model``, and which stored keys to ignore."""

    def get(self, key: str, dtype: torch.dtype | None) -> torch.Tensor:
        """Stored tensor ``key`` in our layout, cast to ``dtype`` (None: the format's default)."""


def fill(model: nn.Module, tensors: Tensors, dtype: torch.dtype | None = None, device=None) -> nn.Module:
    """Check ``tensors`` strictly against ``model``, then assign them (one at a time) in place of its parameters."""
    rules, ignore = tensors.rules(model)
    plan = check_strict(rules, tensors.shapes(), model, tensors.source, ignore=ignore, by=tensors.by)
    state: dict[str, torch.Tensor] = {}
    stacked: tuple[str, torch.Tensor] | None = None  # the last stacked tensor read (its experts' rows are adjacent)
    for r in plan:
        if r.index is not None:  # one expert of a stacked (E, ...) tensor: read it once, slice it E times
            if stacked is None or stacked[0] != r.theirs:
                stacked = (r.theirs, tensors.get(r.theirs, dtype))
            t = stacked[1][r.index]
        else:
            t = tensors.get(r.theirs, dtype)
        if r.transpose:
            t = t.t()
        # .contiguous() copies only a transposed tensor: otherwise a parameter stays a view of the file
        state[r.ours] = (t.to(device) if device is not None else t).contiguous()
        del t
    del stacked
    model.load_state_dict(state, strict=False, assign=True)
    return model


def materialize(cfg: ModelConfig, tensors: Tensors, dtype: torch.dtype | None = None, device=None, *,
                prepare: Callable[[LanguageModel], None] | None = None) -> LanguageModel:
    """Build the model for ``cfg`` from ``tensors``: strictly checked, finished, cast, moved, in eval mode.

    Args:
        cfg: the checkpoint's model config.
        tensors: the reader's tensor source.
        dtype: weights dtype; None keeps the format's default (the stored dtype, float32 for GGUF).
        device: where the weights go, tensor by tensor (default CPU).
        prepare: changes the empty model before the check (a classifier head, LoRA adapters).
    """
    model = empty_model(cfg)
    if prepare is not None:
        prepare(model)
    fill(model, tensors, dtype, device)
    model.finish_loading()  # non-persistent buffers (RoPE tables) left on meta, then tying
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # the key map missed a parameter: a gptlab bug, not the user's
        raise GptlabError(f"parameters {left[:5]} were not loaded from {tensors.source} (please report this bug)")
    if device is not None:
        model = model.to(device)  # the derived buffers
    return model.eval()
