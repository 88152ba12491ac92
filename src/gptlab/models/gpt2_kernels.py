"""The loader of ``gpt2_kernels.c``: GPT-2's native CPU training kernels (attention, GELU), built on first use.

Read with :mod:`gptlab.models.fused_attention` and :mod:`gptlab.models.fused_gelu`, the two users.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Sequence

import torch

from gptlab.ccompile import compiled

_SOURCE = Path(__file__).with_name("gpt2_kernels.c")
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable here


def build(flags: Sequence[str] = ()) -> ctypes.CDLL | None:
    """``gpt2_kernels.c`` compiled for this machine (``flags`` after ccompile's own: tests build the AVX2
    code of an AVX-512 CPU with ``-mno-avx512f``) with its functions declared; None where it cannot be."""
    lib = compiled(_SOURCE, "GPT-2's attention and GELU layers", flags)
    if lib is not None:
        p, i, f, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_long
        lib.gptlab_causal_attention_forward.argtypes = [i, i, i, i, p, p, p, f, i]
        lib.gptlab_causal_attention_backward.argtypes = [i, i, i, i, p, p, p, p, p, f, i]
        lib.gptlab_causal_attention_forward.restype = lib.gptlab_causal_attention_backward.restype = i
        lib.gptlab_attention_supports.argtypes, lib.gptlab_attention_supports.restype = [i], i
        lib.gptlab_attention_lanes.argtypes, lib.gptlab_attention_lanes.restype = [], i
        lib.gptlab_gelu_forward.argtypes = [n, p, p, i]
        lib.gptlab_gelu_backward.argtypes = [n, p, p, p, i]
        lib.gptlab_gelu_forward.restype = lib.gptlab_gelu_backward.restype = i
        lib.gptlab_gelu_supported.argtypes, lib.gptlab_gelu_supported.restype = [], i
    return lib


def kernels() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (no compiler, ``GPTLAB_NATIVE=0``)."""
    global _lib
    if _lib is None:
        _lib = build() or False
    return _lib or None


def compiling() -> bool:
    """Inside torch.compile: a ctypes call would split the graph, so PyTorch's op is traced instead."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())
