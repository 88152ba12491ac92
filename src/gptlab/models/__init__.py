"""Model families and their configs. ``build_model(cfg)`` picks the family."""

from __future__ import annotations

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


__all__ = ["ConfigError", "GPT2Config", "ModelConfig", "build_model", "get_preset", "list_presets"]
