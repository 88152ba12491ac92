"""Load a GGUF file straight into int4/int8 layers, without a float copy of the model.

``load_gguf(path, quantize="int4")`` builds the same model as
``quantize_int4(load_gguf(path))`` does, but one tensor at a time:

- a Q4_0 or Q4_1 linear weight becomes an :class:`~gptlab.inference.quantize.Int4Linear`
  from its blocks as they are: a Q4_1 block (d, m, 32 codes) is the layer's
  group (scale d, minimum m, codes); Q4_0's (d, codes) is minimum -8·d. Only
  the nibble order changes (llama.cpp stores weight j and j + 16 in one byte);
  d and m are rounded from f16 to the kernel's bf16;
- any other linear weight (Q8_0, K-quants, F16, ...) is dequantized alone and
  quantized at once, so at most one float tensor exists at a time;
- the output head is int8 (as under ``quantize_int4``). A head tied to the
  embedding (SmolLM2) is one int8 table used by both: the head computes with
  it and the embedding looks up its rows (:class:`~gptlab.inference.quantize.Int8Embedding`),
  read from the file in row blocks;
- norms, biases and anything else load as usual (float32).

Peak memory while loading is then about the quantized model, not the fp32 one
(measured by ``benchmarks/load_memory.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from gptlab.inference.quantize import (Int4Linear, Int8Embedding, Int8Linear, apply_quantization, check_scheme,
                                       int8_rows)
from gptlab.device import return_freed_memory
from gptlab.models import empty_model
from gptlab.models.base import LanguageModel
from gptlab.weights.dequant import QK
from gptlab.weights.gguf import GGUFTensors, open_gguf, unpermute_rows
from gptlab.weights.keymaps import check_strict

_ROW_BLOCK = 256  # rows of a large table read at a time (small temporaries keep the peak low)


def _codes_from_blocks(raw: np.ndarray, type_name: str, shape: tuple[int, int]):
    """(codes (out, in) uint8, scale, minimum (out, in/32) float32) of a Q4_0 / Q4_1 tensor."""
    out_f, in_f = shape
    size = 18 if type_name == "Q4_0" else 20
    blocks = np.asarray(raw).reshape(-1).view(np.uint8).reshape(-1, size)  # (out · in/32, bytes)
    d = np.ascontiguousarray(blocks[:, 0:2]).view("<f2").astype(np.float32)[:, 0]
    if type_name == "Q4_0":
        m, qs = -8.0 * d, blocks[:, 2:]
    else:
        m, qs = np.ascontiguousarray(blocks[:, 2:4]).view("<f2").astype(np.float32)[:, 0], blocks[:, 4:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # (blocks, 32): weight j, then j + 16
    groups = in_f // QK
    return (torch.from_numpy(codes.reshape(out_f, in_f)), torch.from_numpy(d.reshape(out_f, groups)),
            torch.from_numpy(m.reshape(out_f, groups)))


def _int4_direct(tensors: GGUFTensors, key: str, bias) -> Int4Linear:
    info = tensors.f.tensors[key]
    codes, scale, minimum = _codes_from_blocks(tensors.f.read(key), info.type_name, info.shape)
    if tensors.permuted and (".attn_q." in key or ".attn_k." in key):  # the rows of q/k as llama.cpp reordered them
        heads = tensors.cfg.n_heads if ".attn_q." in key else tensors.cfg.n_kv_heads
        codes, scale, minimum = (unpermute_rows(t, heads) for t in (codes, scale, minimum))
    layer = Int4Linear.from_codes(codes.contiguous(), scale.contiguous(), minimum.contiguous(), bias)
    return layer


def _int8_table(tensors: GGUFTensors, key: str, bias=None) -> Int8Linear:
    """An int8 layer from a (large) tensor read in row blocks: no float copy of the whole table."""
    info = tensors.f.tensors[key]
    rows, cols = info.shape
    q = torch.empty(rows, cols, dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.bfloat16)
    per_chunk = _ROW_BLOCK * cols // QK  # blocks in a row block (every supported format has 32 | cols)
    for start, piece in tensors.f.chunks(key, per_chunk):
        r = start // cols
        w = torch.from_numpy(piece).reshape(-1, cols)
        q[r:r + w.shape[0]], scale[r:r + w.shape[0]] = int8_rows(w)
        return_freed_memory()
    return Int8Linear.from_int8(q, scale, bias)


def _quantized_linear(tensors: GGUFTensors, key: str, scheme: str, is_head: bool, bias) -> nn.Module:
    type_name = tensors.f.tensors[key].type_name
    if scheme == "int4" and not is_head and type_name in ("Q4_0", "Q4_1"):
        return _int4_direct(tensors, key, bias)
    if is_head or scheme == "int8":
        if not (tensors.permuted and (".attn_q." in key or ".attn_k." in key)):
            return _int8_table(tensors, key, bias)
    w = tensors.get(key, torch.float32)  # one tensor in float, quantized at once
    linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    if scheme == "int8" or w.shape[1] % QK:
        return Int8Linear(linear)
    return Int4Linear(linear)


def load_gguf_quantized(path: str | Path, scheme: str, device=None) -> LanguageModel:
    """A GGUF checkpoint loaded straight into ``scheme`` ("int4" or "int8") layers (see the module doc)."""
    scheme = check_scheme(scheme)
    f, cfg = open_gguf(path)
    tensors = GGUFTensors(f, cfg)
    model = empty_model(cfg)
    rules, ignore = tensors.rules(model)
    plan = check_strict(rules, tensors.shapes(), model, tensors.source, ignore=ignore, by=tensors.by)
    head = model.get_head()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    emb_key = next(n for n, m in model.named_modules() if m is model.get_embedding()) + ".weight"
    direct = {r.ours[:-len(".weight")]: r for r in plan
              if r.index is None and r.ours.endswith(".weight") and r.ours[:-len(".weight")] in linears}
    state: dict[str, torch.Tensor] = {}
    for r in plan:
        if r.ours[:-len(".weight")] in direct and r.ours.endswith(".weight"):
            continue
        if r.ours == emb_key and cfg.tie_embeddings:
            continue
        t = tensors.get(r.theirs, torch.float32)
        state[r.ours] = (t.t() if r.transpose else t).contiguous()
    model.load_state_dict(state, strict=False, assign=True)
    for name, r in direct.items():
        parent, _, child = name.rpartition(".")
        bias = state.get(name + ".bias")
        layer = _quantized_linear(tensors, r.theirs, scheme, linears[name] is head, bias)
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        return_freed_memory()  # the conversion's temporaries, so that holes do not add up to the peak
    if cfg.tie_embeddings:  # one int8 table for the embedding and the head
        emb_rule = next(r for r in plan if r.ours == emb_key)
        table = _int8_table(tensors, emb_rule.theirs)
        model.set_head(table)
        model.set_embedding(Int8Embedding(table))
    model.reset_buffers()
    apply_quantization(model, scheme)  # whatever is left in float (a mixture's stacked experts)
    return model.to(device).eval() if device is not None else model.eval()
