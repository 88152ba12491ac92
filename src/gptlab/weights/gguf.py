"""Loading llama.cpp GGUF checkpoints into gptlab's Llama and GPT-2 models.

A GGUF file is one memory-mapped container: a metadata table (architecture
hyperparameters under ``{arch}.*``, the tokenizer under ``tokenizer.*``) and
named tensors, most of them quantized in blocks (``weights/dequant.py``).

Loading is: metadata -> :class:`LlamaConfig` (``gguf_config``), then the one
load path (``weights/materialize.py``) asks :class:`GGUFTensors` for each
tensor: dequantize in chunks, undo llama.cpp's row permutation of the
query/key projections, cast -- one tensor at a time, read from the file (not mapped),
so peak memory is about the final model plus one tensor.

Names (``GGUF_KEYS``, in the KeyRule dialect of ``weights/keymaps.py``; N is the layer index):

    token_embd              embed_tokens
    blk.N.attn_norm         layers.N.input_layernorm
    blk.N.attn_{q,k,v}      layers.N.self_attn.{q,k,v}_proj   (q, k rows permuted in the file)
    blk.N.attn_output       layers.N.self_attn.o_proj
    blk.N.ffn_norm          layers.N.post_attention_layernorm
    blk.N.ffn_{gate,up,down} layers.N.mlp.{gate,up,down}_proj
    output_norm             norm
    output                  lm_head                             (absent: tied to the embedding)

GPT-2 files (``general.architecture = "gpt2"``) use ``GPT2_GGUF_KEYS``: one fused
``blk.N.attn_qkv``, LayerNorms with biases, ``position_embd`` for the learned positions.
The tables (tensor names per architecture, ``GGUF_META``: our config field <->
``{arch}.KEY``) live in ``weights/gguf_tables.py``; ``weights/gguf_export.py`` writes
files through the same tables, read the other way.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.weights.dequant import FORMATS
from gptlab.weights.gguf_file import GGUFFile, TensorInfo, read_gguf, read_metadata  # noqa: F401  (re-exported)
from gptlab.weights.gguf_tables import (GGUF_ARCHS, GGUF_KEYS, GGUF_META, GPT2_GGUF_KEYS,  # noqa: F401
                                       NON_PARAMETERS, NORM_TOPK_ARCHS, OPTIONAL, PERMUTED_ARCHS, REQUIRED,
                                       SUPPORTED_ARCHS,
                                       MetaKey, f32_value)
from gptlab.weights.keymaps import expand_rules, theirs_pattern
from gptlab.weights.materialize import materialize

_KEY_RES = {arch: [(theirs_pattern(r), r.ours) for r in table] for arch, (_, table) in GGUF_ARCHS.items()}


def map_name(gguf_name: str, arch: str = "llama") -> str | None:
    """Our parameter name for a GGUF tensor name of ``arch``, or None if the key map has no row for it."""
    for rx, ours in _KEY_RES[arch]:
        m = rx.match(gguf_name)
        if m:
            return ours.replace("{i}", m.group("i")) if "{i}" in ours else ours
    return None


# ---- metadata -> config ----

def _rope_scaling_from_freqs(freqs: np.ndarray, head_dim: int, theta: float, meta: dict, arch: str) -> dict:
    """Recover the Llama 3 rope_scaling dict from llama.cpp's precomputed ``rope_freqs`` tensor.

    llama.cpp stores the per-frequency divisors (1 for short wavelengths, ``factor``
    for long ones, interpolated between) instead of the four scaling numbers. We
    take ``factor`` = the largest divisor, Llama 3's low/high frequency factors
    (1, 4) and the original context, and accept them only if they reproduce the tensor.
    """
    from gptlab.models.attention import rope_frequencies

    orig = int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192))
    scaling = {"rope_type": "llama3", "factor": float(freqs.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": orig}
    base = rope_frequencies(head_dim, theta)
    ours = rope_frequencies(head_dim, theta, scaling)
    if not torch.allclose(base / ours, torch.from_numpy(np.asarray(freqs, np.float32)), rtol=1e-3):
        raise GptlabError("the GGUF file's rope_freqs tensor is not Llama 3 scaling with low/high frequency "
                          "factors 1/4; this RoPE scaling is not supported")
    return scaling


def gguf_config(meta: dict[str, Any], tensors: dict[str, tuple[str, tuple[int, ...]]] | None = None,
                freqs: np.ndarray | None = None, source: str = "GGUF file"):
    """Build the model config (:class:`LlamaConfig` or :class:`GPT2Config`) from GGUF metadata.

    Args:
        meta: ``read_metadata(path)``.
        tensors: {name: (type, shape)}; used to detect tied embeddings (no ``output.weight``)
            and q/k/v biases. Defaults to ``meta["__tensors__"]``.
        freqs: the ``rope_freqs.weight`` values, if the file has them (Llama 3 scaling).
        source: file name for error messages.
    """
    from gptlab.models import get_family

    tensors = tensors if tensors is not None else meta.get("__tensors__", {})
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GptlabError(f"{source}: architecture {arch!r} is not supported "
                          f"(supported: {', '.join(sorted(SUPPORTED_ARCHS))})")
    kw: dict[str, Any] = {}
    for f in GGUF_META[arch]:  # the declarative part: {arch}.KEY -> field
        full = f"{arch}.{f.key}"
        if full in meta:
            kw[f.ours] = f.cast(meta[full])
        elif f.default == REQUIRED:
            raise GptlabError(f"{source}: metadata key {full} is missing; the file is incomplete")
        elif f.default != OPTIONAL:
            kw[f.ours] = f.default
    tokens = meta.get("tokenizer.ggml.tokens")
    if "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"][1][0]
    elif tokens is not None:
        vocab = len(tokens)
    elif f"{arch}.vocab_size" in meta:
        vocab = int(meta[f"{arch}.vocab_size"])
    else:
        raise GptlabError(f"{source}: the vocabulary size is unknown (no token_embd tensor, tokens or "
                          f"{arch}.vocab_size); the file is incomplete")
    blocks = {n.split(".")[1] for n in tensors if n.startswith("blk.")}
    if tensors and len(blocks) != kw.get("n_layers"):  # before a model of that many blocks is built
        raise GptlabError(f"{source}: its metadata says {arch}.block_count = {kw.get('n_layers')} but it holds "
                          f"tensors for {len(blocks)} blocks; the file is corrupt or truncated")
    kw.update(vocab_size=int(vocab), tie_embeddings="output.weight" not in tensors,
              name=str(meta.get("general.name", "gguf")))
    family, _ = GGUF_ARCHS[arch]
    if family == "gpt2":
        kw["qkv_bias"] = "blk.0.attn_qkv.bias" in tensors
    else:
        kw["qkv_bias"] = "blk.0.attn_q.bias" in tensors
        kw["rope_scaling"] = _rope_scaling(meta, arch, kw, freqs, source)
        for ours, key in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id")):
            if f"tokenizer.ggml.{key}" in meta:
                kw[ours] = int(meta[f"tokenizer.ggml.{key}"])
        kw.update(_moe_fields(meta, arch, tensors))  # n_experts, ... and the experts' width
    cls = get_family(family).config
    fields = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in kw.items() if k in fields})
    except ValueError as e:
        raise GptlabError(f"{source}: its hyperparameters do not form a valid config: {e}") from None


def _rope_scaling(meta: dict, arch: str, kw: dict, freqs: np.ndarray | None, source: str) -> dict | None:
    """Llama 3 RoPE scaling from the ``rope_freqs`` tensor; None when there is none; other scalings refused."""
    head_dim = kw.get("head_dim", kw["emb_dim"] // max(kw["n_heads"], 1))  # n_heads 0: the config refuses it
    if freqs is not None:
        return _rope_scaling_from_freqs(freqs, head_dim, kw["rope_theta"], meta, arch)
    stype = meta.get(f"{arch}.rope.scaling.type")
    if stype not in (None, "none") and float(meta.get(f"{arch}.rope.scaling.factor", 1.0)) != 1.0:
        raise GptlabError(f"{source}: RoPE scaling type {stype!r} is not supported (only Llama 3 scaling is)")
    return None


def _moe_fields(meta: dict, arch: str, tensors: dict) -> dict[str, Any]:
    """The mixture-of-experts fields of the config ({} for a dense file), from ``{arch}.expert_*`` metadata."""
    n_experts = int(meta.get(f"{arch}.expert_count", 0) or 0)
    if not n_experts:
        return {}
    out: dict[str, Any] = dict(
        n_experts=n_experts, experts_per_token=int(meta[f"{arch}.expert_used_count"]),
        norm_topk=bool(meta.get(f"{arch}.expert_weights_norm", arch in NORM_TOPK_ARCHS)))
    if "blk.0.ffn_gate_exps.weight" in tensors:  # the experts' width, from the stacked (E, F, d) tensor
        out["hidden_dim"] = int(tensors["blk.0.ffn_gate_exps.weight"][1][1])
    elif meta.get(f"{arch}.expert_feed_forward_length"):
        out["hidden_dim"] = int(meta[f"{arch}.expert_feed_forward_length"])
    if "blk.0.ffn_gate_shexp.weight" in tensors:
        out["shared_expert_dim"] = int(tensors["blk.0.ffn_gate_shexp.weight"][1][0])
    return out


def _our_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shared-expert gate is (1, d) in our model; a converter may have stored it squeezed as (d,)."""
    return (1, *shape) if name.endswith(".ffn_gate_inp_shexp.weight") and len(shape) == 1 else shape


# ---- tensors ----

def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (inverse of its converter's ``permute``).

    Within each head, the converter reorders the hd rows from Hugging Face's
    "rotate half" layout [x_0 .. x_{hd/2-1}, y_0 .. y_{hd/2-1}] to interleaved
    pairs [x_0, y_0, x_1, y_1, ...]. Reading rows as (head, hd/2, 2) and swapping
    the last two axes restores the first layout. Works for weights (rows, in) and biases (rows,).
    """
    rows = w.shape[0]
    rest = w.shape[1:]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *rest)  # (H, hd/2, 2, ...)
            .transpose(1, 2)  # (H, 2, hd/2, ...)
            .reshape(rows, *rest))


class GGUFTensors:
    """The parameters of a GGUF file for :func:`materialize`: read and dequantized one at a time."""

    by = "model"

    def __init__(self, f: GGUFFile, cfg):
        self.f, self.cfg, self.source = f, cfg, str(f.path)
        self.arch = f.meta["general.architecture"]
        self.permuted = self.arch in PERMUTED_ARCHS

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: _our_shape(n, t.shape) for n, t in self.f.tensors.items()}

    def rules(self, model: nn.Module):
        return expand_rules(GGUF_ARCHS[self.arch][1], self.cfg), lambda k: k in NON_PARAMETERS

    def get(self, key: str, dtype: torch.dtype | None) -> torch.Tensor:
        """Read and dequantize ``key`` to ``dtype`` (default float32) in chunks, un-permute q/k rows."""
        w = self.f.to_torch(key, dtype or torch.float32)
        w = w.reshape(_our_shape(key, tuple(w.shape)))
        if self.permuted and (".attn_q." in key or ".attn_k." in key):
            w = unpermute_rows(w, self.cfg.n_heads if ".attn_q." in key else self.cfg.n_kv_heads)
        return w


def open_gguf(path: str | Path) -> tuple[GGUFFile, Any]:
    """Read a GGUF file's header and check it can be loaded: (the file, its model config).

    The tokenizer's vocabulary is not decoded (the tokenizer reads it itself).
    """
    f = read_gguf(path, vocabulary=False)
    path, meta = f.path, f.meta
    info = {n: (t.type_name, t.shape) for n, t in f.tensors.items()}
    unsupported = sorted({ty for ty, _ in info.values()} - set(FORMATS))
    if unsupported:
        raise GptlabError(f"{path} uses tensor types {', '.join(unsupported)} that gptlab cannot dequantize "
                          f"(supported: {', '.join(FORMATS)}); use a file quantized as e.g. Q4_K_M, Q8_0 or F16")
    freqs = f.to_torch("rope_freqs.weight").numpy() if "rope_freqs.weight" in f.tensors else None
    cfg = gguf_config(meta, info, freqs, source=str(path))
    arch = meta["general.architecture"]
    unexpected = sorted(n for n in f.tensors if n not in NON_PARAMETERS and map_name(n, arch) is None)
    if unexpected:
        raise GptlabError(f"{path}: tensors with no place in the model: {unexpected[:5]}"
                          f"{' ...' if len(unexpected) > 5 else ''} (an unsupported architecture variant?)")
    return f, cfg


def load_gguf(path: str | Path, *, dtype: torch.dtype | None = None, device=None) -> nn.Module:
    """Load a GGUF checkpoint as a gptlab model (dequantized to ``dtype``).

    Args:
        path: the .gguf file.
        dtype: weights dtype (default float32). bf16 halves memory and is fast on
            CPUs with native bf16.
        device: where to put the model (default CPU).

    Every tensor in the file must map to a parameter and every parameter must be
    present, with the right shape; otherwise a GptlabError names the offenders.
    Straight into int4/int8 layers, without a float copy: :func:`gptlab.weights.gguf_quant.load_gguf_quantized`.
    """
    f, cfg = open_gguf(path)
    return materialize(cfg, GGUFTensors(f, cfg), dtype or torch.float32, device)
