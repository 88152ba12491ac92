"""Build one of the package's C files into a shared library on first use, cached on disk.

gptlab ships two small C sources: the int4/int8 inference kernels
(``inference/kernels.c``) and GPT-2's causal attention and GELU used in training
(``models/gpt2_kernels.c``). :func:`compiled` builds either with the
machine's C compiler (``$CC``, else ``cc``; ``-O3 -march=native -fopenmp``:
vector code for this CPU) into ``$GPTLAB_CACHE/kernels/`` (else
``~/.cache/gptlab/kernels/``), named by a hash of the source, the compiler and
the CPU, written atomically; later processes load it in milliseconds.

It returns None (and the callers use PyTorch's kernels: the same results to
float rounding) where there is no compiler, the build fails, the CPU is not
x86-64, or ``GPTLAB_NATIVE=0`` is set. The libraries link the OpenMP runtime
that PyTorch already loaded, so they share its thread pool.
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
from typing import Sequence

from gptlab.fileio import cache_root

log = logging.getLogger(__name__)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def cpu_id() -> str:
    """What the compiled code depends on: the CPU model and its flags (``-march=native``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _native_on() -> bool:
    return os.environ.get("GPTLAB_NATIVE", "1") != "0" and platform.machine().lower() in ("x86_64", "amd64")


def compiler() -> str | None:
    """The C compiler native code would be built with here, or None where it is off (``GPTLAB_NATIVE=0``),
    the CPU is not x86-64 or there is none (``$CC``, else ``cc``, else ``gcc``)."""
    return (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")) if _native_on() else None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (what ``-march=native`` builds for); empty where unreadable."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), set())


def _build(cc: str, source: Path, out: Path, flags: Sequence[str] = ()) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, *flags, str(source), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(tmp, out)  # atomic: a concurrent process sees the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def compiled(source: Path, what: str, flags: Sequence[str] = ()) -> ctypes.CDLL | None:
    """``source`` built for this machine and loaded, or None where native code is off or cannot be built
    (``what`` names the callers' fallback in the log line: "int4/int8 layers"). ``flags`` go after
    :data:`FLAGS` (tests build the AVX2 code of an AVX-512 machine with ``-mno-avx512f``)."""
    cc = compiler()
    if cc is None:
        if _native_on():
            log.info("no C compiler found: %s use PyTorch's kernels", what)
        return None
    key = hashlib.sha256(source.read_bytes() + " ".join([cc, *FLAGS, *flags]).encode() + cpu_id().encode())
    path = cache_root() / "kernels" / f"gptlab-{source.stem}-{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            _build(cc, source, path, flags)
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.info("gptlab's %s could not be built (%s): %s use PyTorch's kernels", source.name,
                 detail.strip()[:300], what)
        return None
