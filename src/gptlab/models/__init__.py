"""Model families and their configs. ``build_model(cfg)`` picks the family."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.models.base import LanguageModel
from gptlab.models.config import (FAMILIES, ConfigError, Family, ModelConfig, get_family, get_preset,
                                  list_presets)

# The family registry: each module registers its Family and presets on import. A new family is one more name here.
from gptlab.models import gpt2, llama  # noqa: E402,F401  (registration)
from gptlab.models.gpt2 import GPT2Config  # noqa: E402
from gptlab.models.llama import LlamaConfig  # noqa: E402


def build_model(cfg: ModelConfig) -> LanguageModel:
    """Instantiate the model class of ``cfg``'s family (randomly initialised)."""
    if not isinstance(cfg, ModelConfig):
        raise GptlabError(f"build_model: cfg must be a ModelConfig (e.g. gptlab.get_preset('gpt2-mini')), "
                          f"got {type(cfg).__name__}")
    return get_family(cfg.family).model(cfg)


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_",
                   "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextlib.contextmanager
def _no_init():
    """Skip torch.nn.init while building: on the meta device it only costs time
    (its first call imports torch._dynamo, seconds on a busy machine)."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def empty_model(cfg: ModelConfig) -> LanguageModel:
    """The model for ``cfg`` on the meta device: shapes only, no memory, no initialisation.

    Loaders fill it with ``load_state_dict(..., assign=True)`` and then call
    ``finish_loading()`` (derived buffers such as RoPE tables, then weight tying).
    """
    with _no_init(), torch.device("meta"):
        return build_model(cfg)


__all__ = ["FAMILIES", "ConfigError", "Family", "GPT2Config", "LanguageModel", "LlamaConfig", "ModelConfig",
           "build_model", "empty_model", "get_family", "get_preset", "list_presets"]
