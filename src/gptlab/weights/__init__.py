"""Loading and exporting model weights: one entry point, ``load_model(ref)``.

``ref`` may be:

    RUN_DIR or RUN_DIR/model     a gptlab training run or model directory   (weights/native.py)
    HF_DIR                       a Hugging Face directory: config.json + safetensors   (weights/hf.py)
    FILE.gguf                    a llama.cpp GGUF file   (weights/gguf.py)
    owner/name                   a Hugging Face Hub repo id, downloaded into the cache   (weights/hub.py)
    pkg:PACKAGE/PATH             a file or folder inside an installed Python package

:func:`gptlab.refs.resolve` turns ``ref`` into a local path; the first entry of
:data:`LOADERS` whose test accepts the path reads it, and every format hands
its config and tensors to the one :func:`gptlab.weights.materialize.materialize`.
A new format is one more row in that list (and one reader module here).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.refs import records_a_run, resolve


@dataclass(frozen=True)
class Loader:
    """One checkpoint format: a name, a test on the local path, and ``"module:function"`` to load it.

    The function is called as ``fn(path, dtype=..., device=...)`` and returns the model.
    """

    name: str
    accepts: Callable[[Path], bool]
    target: str

    def load(self, path: Path, dtype, device) -> nn.Module:
        module, fn = self.target.split(":")
        return getattr(importlib.import_module(module), fn)(path, dtype=dtype, device=device)


def _is_native(p: Path) -> bool:
    from gptlab.weights.native import is_native_dir

    return p.is_dir() and is_native_dir(p)


def _is_hf(p: Path) -> bool:
    from gptlab.weights.hf import is_hf_dir

    return p.is_dir() and is_hf_dir(p)


LOADERS: list[Loader] = [
    Loader("gptlab", _is_native, "gptlab.weights.native:load_model_dir"),
    Loader("huggingface", _is_hf, "gptlab.weights.hf:load_hf_dir"),
    Loader("gguf", lambda p: p.is_file() and p.suffix == ".gguf", "gptlab.weights.gguf:load_gguf"),
]


def load_model(ref: str | Path, dtype: torch.dtype | str | None = None, device=None) -> nn.Module:
    """Load a model from any supported reference (see the module docstring), in eval mode.

    Args:
        ref: run/model dir, Hugging Face dir or repo id, .gguf file, or pkg:PACKAGE/PATH.
        dtype: weights dtype (torch dtype or "fp32"/"bf16"/"fp16"); None keeps the stored one.
        device: where to put the model (default CPU).
    """
    from gptlab.device import parse_dtype, pick_device

    dtype = parse_dtype(dtype)
    device = None if device is None else pick_device(device)  # "cuda" on a CPU-only build: one clear line
    path = resolve(ref)
    for loader in LOADERS:
        if loader.accepts(path):
            return loader.load(path, dtype, device)
    if path.is_dir() and records_a_run(path):
        ck = sorted(path.glob("checkpoints/step-*/config.json"))
        hint = f"resume it, or load its checkpoint {ck[-1].parent}" if ck else "resume it to train further"
        raise GptlabError(f"{path} is a training run with no model saved yet (it stopped before its first "
                          f"evaluation); {hint}")
    if path.is_dir():
        raise GptlabError(f"{path} has no config.json: not a gptlab model directory, training run or "
                          "Hugging Face model directory")
    raise GptlabError(f"{path}: unknown checkpoint format (known: {', '.join(l.name for l in LOADERS)}); "
                      "give a model directory or a .gguf file")


__all__ = ["LOADERS", "Loader", "load_model"]
