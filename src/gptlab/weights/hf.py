"""Hugging Face model directories: config.json <-> ModelConfig, and safetensors loading.

A Hugging Face directory holds ``config.json`` (with ``architectures``) and
``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
Supported architectures are those of the registered families
(``Family.hf_architectures``); each family translates its own config.json
(``Family.hf_config``, in ``models/gpt2.py`` / ``models/llama.py``), so this
file names no family.

Loading is memory-efficient: the model is built on the meta device (no
memory) and each parameter becomes a zero-copy view of the memory-mapped
file (private, copy-on-write), so loading is nearly instant and memory grows
only to the size of the weights as they are used. Only a dtype conversion or
a transposed GPT-2 weight makes a copy, one tensor at a time.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from gptlab.errors import GptlabError
from gptlab.models import FAMILIES, ConfigError, ModelConfig
from gptlab.models.config import family_for_architecture
from gptlab.weights.keymaps import IGNORED, TIED_HEAD, expand, normalize_keys
from gptlab.weights.materialize import materialize

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _architectures() -> list[str]:
    return [a for f in FAMILIES.values() for a in f.hf_architectures]


def _from_model_type(model_type: str) -> str:
    """The architecture a config without ``architectures`` means (``llama`` -> ``LlamaForCausalLM``)."""
    return next((a for a in _architectures()
                 if a.lower().removesuffix("forcausallm").removesuffix("lmheadmodel") == model_type.lower()), "")


# ---- config.json -> ModelConfig (each family translates its own: Family.hf_config) ----

def read_hf_config(path: str | Path) -> dict:
    """The parsed ``config.json`` of a Hugging Face model directory."""
    p = Path(path) / "config.json"
    if not p.is_file():
        raise GptlabError(f"{p} not found; a Hugging Face model directory needs config.json next to its weights")
    try:
        hf = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GptlabError(f"{p} is not valid JSON ({e}); re-download the model") from None
    if not isinstance(hf, dict):
        raise GptlabError(f"{p} is not a Hugging Face config (expected a JSON object)")
    return hf


def architecture(hf: dict) -> str:
    """The supported architecture name of a HF config, or a GptlabError naming what is supported."""
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise GptlabError(f"config.json: architectures={archs!r} must be a list of names such as "
                          "['LlamaForCausalLM']; the file is damaged")
    arch = archs[0] if archs else _from_model_type(str(hf.get("model_type", "")))
    if family_for_architecture(arch) is None:
        shown = arch or f"model_type={hf.get('model_type')!r}"
        raise GptlabError(f"unsupported architecture {shown}; gptlab loads {', '.join(_architectures())}")
    return arch


def config_from_hf(hf: dict) -> ModelConfig:
    """Convert a Hugging Face ``config.json`` dict to the matching gptlab config."""
    arch = architecture(hf)
    family = family_for_architecture(arch)
    if family.hf_config is None:
        raise GptlabError(f"model family {family.name!r} has no Hugging Face config translation")
    try:
        cfg = family.hf_config(hf, arch)
    except ConfigError as e:
        raise GptlabError(f"config.json ({arch}): {e}") from None
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # a field of the wrong type or shape
        raise GptlabError(f"config.json ({arch}) has a field of the wrong type ({type(e).__name__}: {e}); "
                          "the file is damaged or not a Hugging Face config") from None
    name = hf.get("_name_or_path")
    if name:
        cfg.name = str(name)
    return cfg


# ---- safetensors checkpoints (single file or shards) ----

class HFTensors:
    """The tensors of a HF directory under their canonical names, for :func:`materialize`."""

    by = "checkpoint"

    def __init__(self, ckpt: "SafetensorsCheckpoint", cfg: ModelConfig):
        self.ckpt, self.cfg, self.source = ckpt, cfg, str(ckpt.path)
        self.canon = {c: k for k, c in normalize_keys(cfg.family, ckpt.keys()).items()}  # canonical -> stored
        self._target: torch.dtype | None = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        stored = self.ckpt.shapes()
        return {c: stored[k] for c, k in self.canon.items()}

    def rules(self, model: nn.Module):
        ignored = re.compile("|".join(IGNORED))
        tied = self.cfg.tie_embeddings
        return expand(self.cfg.family, self.cfg), lambda k: bool(ignored.match(k)) or (tied and k == TIED_HEAD)

    def get(self, key: str, dtype: torch.dtype | None) -> torch.Tensor:
        """A zero-copy view of the file unless a dtype conversion is needed (one tensor at a time)."""
        if self._target is None:
            self._target = dtype or self.ckpt.dtype()
        t = self.ckpt.get(self.canon[key])
        return t.to(self._target) if t.is_floating_point() else t


class SafetensorsCheckpoint:
    """Tensors of a HF directory, memory-mapped; shards opened lazily by key."""

    def __init__(self, path: str | Path):
        path = Path(path)
        index = path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise GptlabError(f"{index} is not a valid shard index ({e}); re-download the model") from None
            self.files = {k: path / f for k, f in weight_map.items()}
        elif (path / SINGLE_FILE).is_file():
            self.files = None
        else:
            other = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pth"))
            hint = (f" (found {', '.join(other[:3])}: pickled PyTorch weights are not loaded for safety; "
                    "convert them to safetensors)") if other else ""
            raise GptlabError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}{hint}")
        self.path = path
        self._handles: dict[Path, Any] = {}
        self._maps: dict[Path, tuple[mmap.mmap, int, dict]] = {}
        if self.files is None:
            f = self._open(path / SINGLE_FILE)
            self.files = {k: path / SINGLE_FILE for k in f.keys()}
        missing_shards = sorted({p.name for p in self.files.values() if not p.is_file()})
        if missing_shards:
            raise GptlabError(f"{path}: shard file(s) {', '.join(missing_shards)} listed in {INDEX_FILE} are missing; "
                              "re-download the model")

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise GptlabError(f"{file} is corrupt or truncated ({e}); re-download it") from None
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self.files)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of every tensor, read from the headers only."""
        out = {}
        for k, file in self.files.items():
            try:
                out[k] = tuple(self._open(file).get_slice(k).get_shape())
            except SafetensorError as e:
                raise GptlabError(f"{file}: tensor {k!r} listed in the index is not in the file ({e})") from None
        return out

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key``: a zero-copy view of the memory-mapped file when possible.

        The mapping is private (copy-on-write), so the tensor is writable (e.g. for
        fine-tuning) without ever changing the file, and pages are read from disk
        only when first used.
        """
        file = self.files[key]
        self._open(file)  # validates the header and that the file is complete
        view = self._view(file, key)
        if view is not None:
            return view
        try:
            return self._open(file).get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise GptlabError(f"{file}: cannot read tensor {key!r} ({e}); the file is corrupt, re-download it") from None

    def _view(self, file: Path, key: str) -> torch.Tensor | None:
        if file not in self._maps:
            with open(file, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            n = struct.unpack("<Q", mm[:8])[0]  # safetensors: u64 header size, JSON header, data
            self._maps[file] = (mm, 8 + n, json.loads(mm[8:8 + n]))
        mm, base, header = self._maps[file]
        entry = header[key]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if dtype is None or (base + start) % dtype.itemsize or end == start:
            return None  # unusual dtype, unaligned or empty: let safetensors copy it
        count = (end - start) // dtype.itemsize
        return torch.frombuffer(mm, dtype=dtype, count=count, offset=base + start).view(shape)

    def dtype(self) -> torch.dtype:
        """The dtype most weights are stored in (the first floating tensor's)."""
        for k in self.files:
            t = self._open(self.files[k]).get_slice(k)
            dt = _SAFETENSORS_DTYPES.get(t.get_dtype())
            if dt is not None and dt.is_floating_point:
                return dt
        return torch.float32


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def is_hf_dir(path: str | Path) -> bool:
    """True for a directory with a HF ``config.json`` (not a gptlab one)."""
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return True  # let the loader report the broken file
    return isinstance(meta, dict) and meta.get("format") != "gptlab"


def load_hf_dir(path: str | Path, *, dtype: torch.dtype | None = None, device=None) -> nn.Module:
    """Load a Hugging Face model directory into the matching gptlab model, strictly checked.

    ``dtype`` None keeps the stored dtype of the weights.
    """
    path = Path(path)
    cfg = config_from_hf(read_hf_config(path))
    return materialize(cfg, HFTensors(SafetensorsCheckpoint(path), cfg), dtype, device)
