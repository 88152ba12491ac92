"""Reading a GGUF file: header, metadata and tensor table parsed here, tensor data memory-mapped.

:func:`read_gguf` returns a :class:`GGUFFile`; its tensors are dequantized in
chunks (``weights/dequant.py``), read from the file rather than through the map,
so the file never adds its size to a process's memory. The model side
(names, config, loading) is ``weights/gguf.py``.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.weights.dequant import FORMATS, dequantize_chunks


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
        """The stored bytes of tensor ``name`` (a view into the memory map, nothing is read yet)."""
        t = self.tensors[name]
        return self.data[t.start:t.start + t.nbytes]

    def read(self, name: str, first: int = 0, count: int | None = None) -> np.ndarray:
        """A copy of bytes [first, first + count) of tensor ``name`` (default: all of it), read from the file.

        Loaders read this way rather than through the map: a read maps no file
        pages into the process (a mapped page, or a whole large folio of a freshly
        written file, counts in its RSS until released), so only the copy is resident.
        """
        t = self.tensors[name]
        count = t.nbytes - first if count is None else count
        buf = np.empty(count, dtype=np.uint8)
        with open(self.path, "rb") as fh:
            fh.seek(t.start + first)
            got = fh.readinto(memoryview(buf))
        if got != count:
            raise GptlabError(f"{self.path} is truncated: tensor {name} has {got} of {count} bytes; download it again")
        return buf

    def chunks(self, name: str, chunk_blocks: int):
        """Yield ``(first weight index, float32 piece)`` of tensor ``name``, read ``chunk_blocks`` blocks at a
        time: a large table never has its whole size in memory, in bytes or in float."""
        t = self.tensors[name]
        if t.type_name not in FORMATS:  # the clear "not supported" error
            yield from dequantize_chunks(self.raw(name), t.type_name, t.shape)
            return
        per_block, block_bytes, fn = FORMATS[t.type_name]
        n_blocks = t.nbytes // block_bytes
        for s in range(0, n_blocks, chunk_blocks):
            nb = min(chunk_blocks, n_blocks - s)
            blocks = self.read(name, s * block_bytes, nb * block_bytes).reshape(nb, block_bytes)
            yield s * per_block, fn(blocks).reshape(-1)

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
        process's RSS; a caller of :meth:`raw` that is done with a tensor can give
        them back. (The loaders use :meth:`read`, which maps nothing.)
        """
        t = self.tensors[name]
        self._release(t.start, t.start + t.nbytes)

    def _release(self, start: int, end: int) -> None:
        """``madvise(MADV_DONTNEED)`` over bytes [start, end), widened to the kernel's fault-around window
        (64 KiB): a read maps the cached pages around the one it touched, and a page released early
        is only read again from the page cache if needed. Where the OS or NumPy offers no madvise,
        nothing."""
        mm = getattr(self.data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        grain = _FAULT_AROUND
        start = start // grain * grain
        end = min(-(-end // grain) * grain, len(mm))
        if end > start:
            try:
                mm.madvise(mmap.MADV_DONTNEED, start, end - start)
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
    f = GGUFFile(path, version, meta, tensors, data)
    f._release(0, data.size)  # the header's pages: its values are Python objects now
    return f


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
