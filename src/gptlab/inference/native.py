"""gptlab's own CPU kernels for int4/int8 weights (``kernels.c``), built on first use and cached.

The C file ships with the package. The first call compiles it with the machine's C
compiler (``$CC``, else ``cc``; ``-O3 -march=native -fopenmp``: vector code for this
CPU) into ``$GPTLAB_CACHE/kernels/`` (else ``~/.cache/gptlab/kernels/``), named by a
hash of the source, the compiler and the CPU, written atomically; later processes load
it in milliseconds. Where there is no compiler, the build fails, the CPU has neither
AVX-512 nor AVX2, or ``GPTLAB_NATIVE=0`` is set, :func:`kernels` returns None and the
layers use PyTorch's kernels instead (same results to float rounding).

The layers call :func:`q4_matmul` / :func:`i8_matmul` for float32 activations on the
CPU. OpenMP threads: ``torch.get_num_threads()``; the library links the OpenMP runtime
that PyTorch already loaded, so both share one thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from gptlab.fileio import cache_root
from gptlab.models.llama import RMSNorm

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("kernels.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable here


def _cpu_id() -> str:
    """What the compiled code depends on: the CPU model and its flags (``-march=native``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _build(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(tmp, out)  # atomic: a concurrent process sees the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def kernels() -> ctypes.CDLL | None:
    """The compiled kernels (built now if needed), or None where they cannot be used here."""
    global _lib
    if _lib is None:
        _lib = _load() or False
    return _lib or None


def _load() -> ctypes.CDLL | None:
    if os.environ.get("GPTLAB_NATIVE", "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler found: int4/int8 layers use PyTorch's kernels")
        return None
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([cc, *_FLAGS]).encode() + _cpu_id().encode())
    path = cache_root() / "kernels" / f"gptlab-kernels-{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.info("gptlab's native kernels could not be built (%s): using PyTorch's kernels", detail.strip()[:300])
        return None
    if lib.gptlab_kernels_isa() == 0:
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.gptlab_q4_matmul.argtypes = [i, i, i, p, p, p, p, p, p, i]
    lib.gptlab_i8_matmul.argtypes = [i, i, i, p, p, p, p, p, i]
    lib.gptlab_q4_matmul.restype = lib.gptlab_i8_matmul.restype = i
    lib.gptlab_rms_norm.argtypes = [i, i, p, p, ctypes.c_float, p]
    lib.gptlab_rms_norm.restype = None
    return lib


def usable(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether the native kernels take activations ``x`` (CPU, no gradient to record) on this machine."""
    if x.device.type != "cpu" or (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
        return False
    return kernels() is not None


def _rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """``x`` as contiguous float32 rows (M, K) (a view when it is already)."""
    x2 = x.reshape(-1, in_features)
    return x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.float().contiguous()


def q4_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ Wᵀ + bias`` for an int4 layer's buffers (see ``kernels.c`` for the layout); float32 out."""
    n, k = codes.shape[0], codes.shape[1] * 2
    x2 = _rows(x, k)
    y = torch.empty(x2.shape[0], n)
    b = bias.float().contiguous() if bias is not None else None
    rc = kernels().gptlab_q4_matmul(x2.shape[0], n, k, x2.data_ptr(), codes.data_ptr(), scale.data_ptr(),
                                    minimum.data_ptr(), b.data_ptr() if b is not None else None, y.data_ptr(),
                                    torch.get_num_threads())
    if rc:
        raise ValueError(f"int4 kernel refused shapes x {tuple(x2.shape)}, codes {tuple(codes.shape)}")
    return y.reshape(*x.shape[:-1], n)


def i8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ Wᵀ + bias`` for an int8 layer with one bf16 scale per output row; float32 out."""
    n, k = q.shape
    x2 = _rows(x, k)
    y = torch.empty(x2.shape[0], n)
    b = bias.float().contiguous() if bias is not None else None
    rc = kernels().gptlab_i8_matmul(x2.shape[0], n, k, x2.data_ptr(), q.data_ptr(), scale.data_ptr(),
                                    b.data_ptr() if b is not None else None, y.data_ptr(), torch.get_num_threads())
    if rc:
        raise ValueError(f"int8 kernel refused shapes x {tuple(x2.shape)}, weights {tuple(q.shape)}")
    return y.reshape(*x.shape[:-1], n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight · x / sqrt(mean(x²) + eps)`` over the last dimension, float32 (one call, no temporaries)."""
    d = x.shape[-1]
    x2 = _rows(x, d)
    y = torch.empty_like(x2)
    kernels().gptlab_rms_norm(x2.shape[0], d, x2.data_ptr(), weight.data_ptr(), eps, y.data_ptr())
    return y.view(x.shape)


class NativeRMSNorm(RMSNorm):
    """A Llama RMSNorm that computes with :func:`rms_norm` where the native kernels take its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.float32 and self.weight.dtype == torch.float32 and not self.unit_offset
                and usable(x, self.weight)):
            return rms_norm(x, self.weight, self.eps)
        return super().forward(x)


def use_native_norms(model: nn.Module) -> nn.Module:
    """Let ``model``'s RMSNorms (inference, in place) compute with the native kernel where it exists."""
    if kernels() is None:
        return model
    for name, mod in list(model.named_modules()):
        if type(mod) is RMSNorm:
            parent_name, _, child = name.rpartition(".")
            fast = NativeRMSNorm.__new__(NativeRMSNorm)
            fast.__dict__.update(mod.__dict__)  # the same parameters and settings: only forward differs
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fast)
    return model
