"""gptlab: build, pretrain, fine-tune, evaluate, serve and size GPT- and Llama-style models.

The public API is re-exported lazily here so ``import gptlab`` stays cheap:

    gptlab.load_tokenizer(spec)            tokenizers/
    gptlab.load_model(ref, dtype=...)      weights/
    gptlab.build_model(cfg), gptlab.get_preset(name)   models/
    gptlab.generate(model, ids, ...)       inference/
    gptlab.open_model(ref, ...)            inference/
    gptlab.train(...)                      training/
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_tokenizer": "gptlab.tokenizers",
    "load_model": "gptlab.weights",
    "build_model": "gptlab.models",
    "get_preset": "gptlab.models",
    "list_presets": "gptlab.models",
    "ModelConfig": "gptlab.models.config",
    "GPT2Config": "gptlab.models",
    "generate": "gptlab.inference",
    "open_model": "gptlab.inference",
    "train": "gptlab.training",
    "TrainConfig": "gptlab.training",
    "GptlabError": "gptlab.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gptlab' has no attribute {name!r}")


__all__ = sorted(_LAZY)
