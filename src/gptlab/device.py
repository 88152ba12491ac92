"""Choosing device and precision automatically (CUDA, Apple MPS, or CPU)."""

from __future__ import annotations

import re

import torch

from gptlab.errors import GptlabError


DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mig:N, mig:UUID or mps"


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def _not_here() -> str:
    """Which accelerators this machine lacks, for error messages ('' when it has both)."""
    missing = [n for n, ok in (("cuda", torch.cuda.is_available()), ("mps", _mps_available())) if not ok]
    return f" ({' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not available here)" if missing else ""


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``"auto"``/None -> cuda if available, else mps, else cpu. Validates explicit choices.

    Accepted: auto, cpu, cuda, cuda:N, mps (any case; a torch.device passes through
    the same checks), and on GPUs shared as MIG slices mig:N or mig:UUID, which set
    ``CUDA_VISIBLE_DEVICES`` to that slice before CUDA starts (and cuda:N then counts
    slices; see :mod:`gptlab.mig`). Anything else, or an accelerator this machine
    lacks, is a GptlabError naming ``device=...`` and the valid values.
    """
    if isinstance(device, str):
        from gptlab.mig import visible_device

        device = visible_device(device)
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    name = str(device).strip().lower()
    m = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", name)
    if m is None:
        raise GptlabError(f"device={str(device)!r} is not a device; choose {DEVICE_CHOICES}{_not_here()}")
    kind, index = m.group(1), m.group(2)
    if kind == "cuda" and not torch.cuda.is_available():
        raise GptlabError(f"device={name!r}: no CUDA GPU is available here; use --device cpu or auto")
    if kind == "cuda" and index is not None and int(index) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise GptlabError(f"device={name!r}: this machine has {n} CUDA GPU{'s' if n != 1 else ''} "
                          f"(cuda:0 to cuda:{n - 1}); pick one of those or cuda")
    if kind == "mps" and not _mps_available():
        raise GptlabError(f"device={name!r}: Apple MPS is not available here; use --device cpu or auto")
    return torch.device(name)


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


def return_freed_memory() -> None:
    """Give memory the C allocator holds but no longer uses back to the OS (glibc only; else nothing).

    A loader that converts a model tensor by tensor frees many temporaries between
    the tensors it keeps; glibc keeps those holes resident, so the process's RSS
    grows past what is alive. ``malloc_trim(0)`` returns every free page.
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError, TypeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None  # resolved on first use; False where the C library has no malloc_trim
