"""Model families and their configs. ``build_model(cfg)`` picks the family."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from gptlab.models.config import ConfigError, GPT2Config, ModelConfig, get_preset, list_presets


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the model class of ``cfg``'s family."""
    if cfg.family == "gpt2":
        from gptlab.models.gpt2 import GPT2

        return GPT2(cfg)
    if cfg.family == "llama":
        from gptlab.models.llama import Llama

        return Llama(cfg)
    raise ConfigError(f"no model class for family {cfg.family!r}")


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


def empty_model(cfg: ModelConfig) -> nn.Module:
    """The model for ``cfg`` on the meta device: shapes only, no memory, no initialisation.

    Loaders fill it with ``load_state_dict(..., assign=True)`` and then call
    ``reset_buffers()`` where the family has derived buffers (RoPE tables).
    """
    with _no_init(), torch.device("meta"):
        return build_model(cfg)


__all__ = ["empty_model", "ConfigError", "GPT2Config", "ModelConfig", "build_model", "get_preset", "list_presets"]
