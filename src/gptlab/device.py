"""Choosing device and precision automatically (CUDA, Apple MPS, or CPU)."""

from __future__ import annotations

import torch

from gptlab.errors import GptlabError


def pick_device(device: str | None = None) -> torch.device:
    """``"auto"``/None -> cuda if available, else mps, else cpu. Validates explicit choices."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GptlabError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise GptlabError("device 'mps' requested but Apple MPS is not available; use --device cpu or auto")
    return dev


def cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 matmul (AVX512-BF16 / AMX); then bf16 is fast."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for training on ``device``; None means plain fp32.

    auto: bf16 on CUDA with bf16 support and on CPUs with native bf16, fp16 on
    older CUDA, fp32 elsewhere (MPS autocast is young; fp32 is the safe choice).
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise GptlabError(f"precision {precision!r} must be one of auto, fp32, bf16, fp16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'float32' / torch.dtype -> torch.dtype (None stays None)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise GptlabError(f"dtype {name!r} must be one of {', '.join(DTYPES)}")
    return DTYPES[name]
