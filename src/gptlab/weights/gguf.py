"""Loading llama.cpp GGUF checkpoints into gptlab's Llama and GPT-2 models.

A GGUF file is one memory-mapped container: a metadata table (architecture
hyperparameters under ``{arch}.*``, the tokenizer under ``tokenizer.*``) and
named tensors, most of them quantized in blocks (``weights/dequant.py``).

Loading is: metadata -> :class:`LlamaConfig` (``gguf_config``), then the one
load path (``weights/materialize.py``) asks :class:`GGUFTensors` for each
tensor: dequantize in chunks, undo llama.cpp's row permutation of the
query/key projections, cast, release the file pages -- one tensor at a time,
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
import math
import mmap
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.weights.dequant import FORMATS, dequantize_chunks
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


# ---- reading the file ----
# Layout (little-endian): "GGUF" | version u32 | n_tensors u64 | n_kv u64
#   | n_kv × (key: str, value type u32, value)
#   | n_tensors × (name: str, n_dims u32, dims u64[n_dims] (fastest-varying first), type u32, offset u64)
#   | padding to `general.alignment` (32) | tensor data (each tensor at data start + offset)
# str = u64 length + UTF-8 bytes; array = element type u32 + count u64 + elements.
# We parse this ourselves: gguf.GGUFReader builds a NumPy view for every string of the 49K-token
# vocabulary (5.4 s on the 135M model on a busy 2-core machine; this parser 1.3 s), tested equal to it.

_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
            10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file: GGML type name, PyTorch-order shape, absolute byte range."""

    type_name: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF file: ``meta`` (key -> Python value), ``tensors`` (name -> TensorInfo), and a memory map."""

    path: Path
    version: int
    meta: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data: np.ndarray  # uint8 memory map of the whole file

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor ``name`` (a view into the memory map; the OS is asked to read it ahead)."""
        t = self.tensors[name]
        self._advise("MADV_WILLNEED", t.start, t.start + t.nbytes, outward=False)
        return self.data[t.start:t.start + t.nbytes]

    def chunks(self, name: str, chunk_blocks: int):
        """Yield ``(first weight index, float32 piece)`` of tensor ``name``; each piece's file pages are
        released once the caller has taken it, so a large table never adds its whole size to memory."""
        t = self.tensors[name]
        per_block = FORMATS[t.type_name][0]
        block_bytes = FORMATS[t.type_name][1]
        for start, piece in dequantize_chunks(self.raw(name), t.type_name, t.shape, chunk_blocks=chunk_blocks):
            yield start, piece
            first = t.start + start // per_block * block_bytes
            self._advise("MADV_DONTNEED", first, first + piece.size // per_block * block_bytes)

    def to_torch(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize tensor ``name`` to a torch tensor of ``dtype`` in PyTorch shape order."""
        t = self.tensors[name]
        out = torch.empty(t.shape, dtype=dtype)
        flat = out.view(-1)
        for start, piece in self.chunks(name, 1 << 14):
            flat[start:start + piece.size] = torch.from_numpy(piece)  # cast to dtype while copying
        return out

    def release(self, name: str) -> None:
        """Drop tensor ``name``'s file pages from this process's memory (they stay in the OS page cache).

        A memory map keeps every page it has read resident and counted in the
        process's RSS; after a tensor is dequantized its bytes are not needed
        again, so the loader releases them and the file never adds to peak memory.
        """
        t = self.tensors[name]
        self._advise("MADV_DONTNEED", t.start, t.start + t.nbytes)

    def release_all(self) -> None:
        """Drop every file page this process has mapped (the metadata's and any a neighbour's read brought in)."""
        self._advise("MADV_DONTNEED", 0, self.data.size)

    def _advise(self, advice: str, start: int, end: int, outward: bool = True) -> None:
        """``madvise`` the map's pages over bytes [start, end).

        Released ranges are widened to the kernel's fault-around window (64 KiB): a
        read maps the cached pages around the one it touched, and a page released
        early is only read again from the page cache if needed. Where the OS or
        NumPy offers no madvise this does nothing.
        """
        mm = getattr(self.data, "_mmap", None)
        flag = getattr(mmap, advice, None)
        if mm is None or flag is None or not hasattr(mm, "madvise"):
            return
        grain = _FAULT_AROUND if outward else mmap.PAGESIZE
        start = start // grain * grain
        end = min(-(-end // grain) * grain, len(mm))
        if end > start:
            try:
                mm.madvise(flag, start, end - start)
            except (OSError, ValueError):
                pass


_FAULT_AROUND = 1 << 16  # Linux maps up to 64 KiB of cached pages around a faulting read of a file map


class _Cursor:
    """Reads GGUF header fields; every read is checked against the bytes left (a damaged count or
    length raises ValueError naming the byte, never an OverflowError or a huge allocation)."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(f"{what} at byte {self.pos} needs {n} bytes but the file has {len(self.buf) - self.pos} "
                             "left")

    def scalar(self, code: str):
        size = np.dtype(code).itemsize
        self.need(size, "a value")
        v = np.frombuffer(self.buf, dtype=code, count=1, offset=self.pos)[0]
        self.pos += size
        return v.item()

    def count(self, code: str, min_bytes_each: int, what: str) -> int:
        """A count of items that follow, each at least ``min_bytes_each`` bytes: checked against the file."""
        n = self.scalar(code)
        if n * min_bytes_each > len(self.buf) - self.pos:
            raise ValueError(f"{what} count {n} at byte {self.pos} cannot fit in the {len(self.buf)}-byte file")
        return n

    def string(self) -> str:
        n = self.count("<u8", 1, "string length")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_strings(self) -> bool:
        """Step over an array of strings without decoding it (False, nothing read, if it holds other items)."""
        start = self.pos
        if self.scalar("<u4") != _STRING:
            self.pos = start
            return False
        for _ in range(self.count("<u8", 8, "array")):
            n = self.count("<u8", 1, "string length")
            self.pos += n
        return True

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _ARRAY and depth < 4:
            etype = self.scalar("<u4")
            if etype in _SCALARS:  # one NumPy read for the whole array
                count = self.count("<u8", np.dtype(_SCALARS[etype]).itemsize, "array")
                arr = np.frombuffer(self.buf, dtype=_SCALARS[etype], count=count, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            count = self.count("<u8", 8 if etype == _STRING else 12, "array")
            return [self.value(etype, depth + 1) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype} at byte {self.pos}")


# GGML type ids of the formats gptlab dequantizes (ggml.h's enum ggml_type); others are looked up in the
# gguf package, whose import (with sentencepiece and yaml) costs ~10 MB that a loader need not spend
_TYPE_IDS = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16"}


def _ggml_type(path: Path, name: str, type_id: int) -> tuple[str, int, int]:
    """(type name, weights per block, bytes per block) of a tensor's GGML type id."""
    if type_id in _TYPE_IDS:
        type_name = _TYPE_IDS[type_id]
        return (type_name, *FORMATS[type_name][:2])
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise GptlabError(f"{path}: tensor {name} has unknown GGML type id {type_id}") from None
    if qtype not in GGML_QUANT_SIZES:
        raise GptlabError(f"{path}: tensor {name} has GGML type {qtype.name}, which has no block size")
    return (qtype.name, *GGML_QUANT_SIZES[qtype])


def read_gguf(path: str | Path, *, vocabulary: bool = True) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table; tensor data stays memory-mapped.

    Args:
        path: the .gguf file.
        vocabulary: also decode the tokenizer's string arrays (``tokenizer.ggml.tokens``,
            ``.merges``: ~100K Python strings, ~8 MB); a weight loader that needs none
            of them passes False and they are left out of ``meta``.
    """
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"GGUF file {path} not found; check the path")
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise GptlabError(f"cannot read {path} ({e})") from None
    mm = getattr(data, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        # no read-around: otherwise each small read (a norm) maps ~1 MB of its neighbours' pages
        mm.madvise(mmap.MADV_RANDOM)
    if bytes(data[:4]) != b"GGUF":
        raise GptlabError(f"{path} is not a readable GGUF file (it does not start with the GGUF magic bytes); "
                          "is it another format?")
    if data.size < 24:
        raise GptlabError(f"{path} is truncated: {data.size} bytes, less than a GGUF header (24); download it again")
    cur = _Cursor(memoryview(data))
    cur.pos = 4
    try:
        version = cur.scalar("<u4")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (only 2 and 3 are supported; big-endian files are not)")
        # each tensor entry takes at least 8 + 4 + 4 + 8 bytes, each key/value 8 + 4 + 1
        n_tensors, n_kv = cur.count("<u8", 24, "tensor"), cur.count("<u8", 13, "metadata key")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.scalar("<u4")
            if not vocabulary and vtype == _ARRAY and key.startswith("tokenizer.") and cur.skip_strings():
                continue
            meta[key] = cur.value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<u4")
            if n_dims > 4:  # GGML_MAX_DIMS
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions (GGUF allows at most 4)")
            dims = [cur.scalar("<u8") for _ in range(n_dims)]
            infos.append((name, dims, cur.scalar("<u4"), cur.scalar("<u8")))
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise GptlabError(f"{path} is not a readable GGUF file ({e}); is it truncated?") from None
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or not 1 <= align <= 1 << 20:
        raise GptlabError(f"{path}: general.alignment={align!r} is not a valid alignment; the file is damaged")
    data_start = -(-cur.pos // align) * align
    tensors: dict[str, TensorInfo] = {}
    for name, dims, type_id, offset in infos:
        type_name, per_block, type_size = _ggml_type(path, name, type_id)
        n = math.prod(int(d) for d in dims)  # Python ints: a damaged dimension cannot overflow
        if n % per_block:
            raise GptlabError(f"{path}: tensor {name} has {n} elements, not whole {type_name} blocks of "
                              f"{per_block}; the file is damaged")
        info = TensorInfo(type_name, tuple(int(d) for d in reversed(dims)), data_start + offset,
                          n // per_block * type_size)
        if info.start + info.nbytes > data.size:
            raise GptlabError(f"{path} is truncated: tensor {name} ends at byte {info.start + info.nbytes} "
                              f"but the file has {data.size}; download it again")
        tensors[name] = info
    return GGUFFile(path, version, meta, tensors, data)


def read_metadata(path: str | Path, *, tensors: bool = False) -> dict[str, Any]:
    """The metadata key/values of a GGUF file as plain Python values.

    Args:
        path: the .gguf file.
        tensors: also include ``"__tensors__"``: {name: (type name, shape)} in PyTorch order.
    """
    f = read_gguf(path)
    meta = dict(f.meta)
    if tensors:
        meta["__tensors__"] = {n: (t.type_name, t.shape) for n, t in f.tensors.items()}
    return meta


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
    """The parameters of a GGUF file for :func:`materialize`: dequantized one at a time, pages released."""

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
        """Dequantize ``key`` to ``dtype`` (default float32) in chunks, un-permute q/k rows, release its pages."""
        w = self.f.to_torch(key, dtype or torch.float32)
        w = w.reshape(_our_shape(key, tuple(w.shape)))
        if self.permuted and (".attn_q." in key or ".attn_k." in key):
            w = unpermute_rows(w, self.cfg.n_heads if ".attn_q." in key else self.cfg.n_kv_heads)
        self.f.release(key)
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
    model = materialize(cfg, GGUFTensors(f, cfg), dtype or torch.float32, device)
    f.release_all()
    return model
