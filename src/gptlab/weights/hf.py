"""Hugging Face model directories: config.json <-> ModelConfig, and safetensors loading.

A Hugging Face directory holds ``config.json`` (with ``architectures``) and
``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
Supported architectures and what they become:

    GPT2LMHeadModel                      -> GPT2Config
    LlamaForCausalLM, MistralForCausalLM,
    Qwen2ForCausalLM, GemmaForCausalLM   -> LlamaConfig (differences are config fields)

Loading is memory-efficient: the model is built on the meta device (no
memory) and each parameter becomes a zero-copy view of the memory-mapped
file (private, copy-on-write), so loading is nearly instant and memory grows
only to the size of the weights as they are used. Only a dtype conversion or
a transposed GPT-2 weight makes a copy, one tensor at a time.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from gptlab.errors import GptlabError
from gptlab.models import build_model, empty_model
from gptlab.models import ConfigError, GPT2Config, ModelConfig
from gptlab.weights.keymaps import plan_import

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# HF activation names -> ours (the tanh GELU has three spellings).
_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
         "gelu_tanh": "gelu_tanh"}


# ---- config.json -> ModelConfig ----

def _require(hf: dict, key: str, arch: str) -> Any:
    if hf.get(key) is None:
        raise GptlabError(f"config.json for {arch} has no {key!r}; the file is incomplete or not a {arch} config")
    return hf[key]


def _gpt2_config(hf: dict, arch: str) -> GPT2Config:
    act = hf.get("activation_function", "gelu_new")
    if _ACTS.get(act) != "gelu_tanh":
        raise GptlabError(f"GPT-2 activation_function={act!r} is not supported (gptlab's GPT-2 uses gelu_new)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise GptlabError(f"GPT-2 option {flag}=true is not supported by gptlab's GPT-2")
    if hf.get("scale_attn_weights") is False:
        raise GptlabError("GPT-2 option scale_attn_weights=false is not supported by gptlab's GPT-2")
    return GPT2Config(
        vocab_size=_require(hf, "vocab_size", arch),
        context_length=hf.get("n_positions") or _require(hf, "n_ctx", arch),
        emb_dim=_require(hf, "n_embd", arch),
        n_layers=_require(hf, "n_layer", arch),
        n_heads=_require(hf, "n_head", arch),
        hidden_dim=hf.get("n_inner"),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        qkv_bias=True,
    )


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(theta, Llama 3 scaling or None) from either the v4 or the v5 config layout."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = hf.get("rope_theta") or params.get("rope_theta") or 10000.0
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise GptlabError(f"RoPE scaling type {kind!r} is not supported (gptlab supports the default and 'llama3')")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return float(theta), {k: scaling[k] for k in keys if k in scaling}


def _llama_config(hf: dict, arch: str) -> ModelConfig:
    from gptlab.models.llama import LlamaConfig

    is_gemma = arch == "GemmaForCausalLM"
    is_qwen2 = arch == "Qwen2ForCausalLM"
    if hf.get("mlp_bias"):
        raise GptlabError(f"{arch} with mlp_bias=true is not supported (gptlab's MLP has no biases)")
    if hf.get("attention_bias") and not is_qwen2:
        raise GptlabError(f"{arch} with attention_bias=true (bias on o_proj too) is not supported")
    if is_qwen2 and hf.get("use_sliding_window"):
        raise GptlabError("Qwen2 with use_sliding_window=true (per-layer windows) is not supported")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if is_gemma and act == "gelu":  # Gemma's legacy spelling means the tanh approximation
        act = "gelu_pytorch_tanh"
    if act not in _ACTS:
        raise GptlabError(f"{arch} activation {act!r} is not supported (supported: {', '.join(_ACTS)})")
    theta, scaling = _rope(hf)
    n_heads = _require(hf, "num_attention_heads", arch)
    return LlamaConfig(
        vocab_size=_require(hf, "vocab_size", arch),
        context_length=_require(hf, "max_position_embeddings", arch),
        emb_dim=_require(hf, "hidden_size", arch),
        n_layers=_require(hf, "num_hidden_layers", arch),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim"),
        hidden_dim=_require(hf, "intermediate_size", arch),
        tie_embeddings=hf.get("tie_word_embeddings", is_gemma),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=is_qwen2,
        mlp_act=_ACTS[act],
        embed_scale=is_gemma,
        norm_unit_offset=is_gemma,
        sliding_window=hf.get("sliding_window") if arch == "MistralForCausalLM" else None,
        bos_id=hf.get("bos_token_id"),
        eos_id=hf.get("eos_token_id"),
    )


# architecture -> (gptlab family, config converter)
ARCHITECTURES: dict[str, tuple[str, Callable[[dict, str], ModelConfig]]] = {
    "GPT2LMHeadModel": ("gpt2", _gpt2_config),
    "LlamaForCausalLM": ("llama", _llama_config),
    "MistralForCausalLM": ("llama", _llama_config),
    "Qwen2ForCausalLM": ("llama", _llama_config),
    "GemmaForCausalLM": ("llama", _llama_config),
}
_MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}


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
    arch = archs[0] if archs else _MODEL_TYPES.get(hf.get("model_type", ""), "")
    if arch not in ARCHITECTURES:
        shown = arch or f"model_type={hf.get('model_type')!r}"
        raise GptlabError(f"unsupported architecture {shown}; gptlab loads {', '.join(ARCHITECTURES)}")
    return arch


def config_from_hf(hf: dict) -> ModelConfig:
    """Convert a Hugging Face ``config.json`` dict to the matching gptlab config."""
    arch = architecture(hf)
    try:
        cfg = ARCHITECTURES[arch][1](hf, arch)
    except ConfigError as e:
        raise GptlabError(f"config.json ({arch}): {e}") from None
    name = hf.get("_name_or_path")
    if name:
        cfg.name = str(name)
    return cfg


# ---- safetensors checkpoints (single file or shards) ----

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
    hf = read_hf_config(path)
    cfg = config_from_hf(hf)
    ckpt = SafetensorsCheckpoint(path)
    model = empty_model(cfg)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        own.pop(model.head_key(), None)
    plan = plan_import(cfg.family, cfg, ckpt.shapes(), own, str(path))
    target = dtype or ckpt.dtype()
    state = {}
    for ours, stored, transpose in plan:
        t = ckpt.get(stored)
        if transpose:
            t = t.t()
        # .to() is a no-op when the dtype matches and .contiguous() copies only transposed
        # tensors: otherwise the parameter stays a view of the memory-mapped file.
        state[ours] = t.to(target).contiguous() if t.is_floating_point() else t
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # the key map missed a parameter: a gptlab bug, not the user's
        raise GptlabError(f"parameters {left[:5]} were not loaded from {path} (please report this bug)")
    model.reset_buffers()
    if device is not None:
        model = model.to(device)
    return model.eval()
