"""Speed settings applied to a model and a process from outside: compile, the inductor cache, threads.

- :func:`compile_model`: ``torch.compile`` of a language model's body (``features``); its head and
  loss stay the chunked eager path of :mod:`gptlab.training.losses` (matmuls, which compile does not
  speed up, and no (B, T, V) logits for inductor to materialise). Other modules are compiled whole.
- :func:`use_compile_cache`: inductor's FX-graph and AOT-autograd caches in gptlab's cache folder
  (``$GPTLAB_CACHE/inductor``, kept across runs), so a second run with the same shapes starts fast.
- :func:`physical_cores` / :func:`match_threads`: intra-op threads = physical cores (a hyper-thread
  sibling shares the core's matmul units and slows a compute-bound step down).
- :func:`flush_denormals`: floats below 2^-126 read and written as zero on the CPU threads while a run
  trains (``denormals.c``): on x86 each denormal costs a microcode assist, and a model in training
  makes more of them as it learns.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from gptlab.ccompile import compiled
from gptlab.models.base import LanguageModel

_DENORMALS = Path(__file__).with_name("denormals.c")


def compile_cache_dir() -> Path:
    """Where inductor keeps compiled graphs: ``$TORCHINDUCTOR_CACHE_DIR``, else ``$GPTLAB_CACHE/inductor``."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    root = Path(os.environ.get("GPTLAB_CACHE") or Path.home() / ".cache" / "gptlab")
    return root / "inductor"


def use_compile_cache() -> Path:
    """Turn on inductor's on-disk caches in :func:`compile_cache_dir` (before the first compile); returns it."""
    path = compile_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    inductor_config.autotune_local_cache = True
    import torch._functorch.config as functorch_config

    functorch_config.enable_autograd_cache = True
    return path


class CompiledModel(nn.Module):
    """A language model whose ``features`` run compiled; ``forward`` = its head on them.

    The model itself is ``_orig_mod`` (the attribute ``torch.compile``'s wrapper uses too), so code
    that reaches the model behind a wrapper (the loss's head, a mixture's aux loss) finds it.
    """

    def __init__(self, model: LanguageModel):
        super().__init__()
        self._orig_mod = model
        self._features = torch.compile(model.features)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (B, T, d), compiled."""
        return self._features(ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._orig_mod.get_head()(self.features(ids))  # (B, T, V)


def compile_model(model: nn.Module) -> nn.Module:
    """What the training loop runs with ``compile``: a :class:`CompiledModel` for a gptlab language model
    (the loss stays chunked), ``torch.compile(model)`` for anything else. The on-disk cache is on."""
    use_compile_cache()
    return CompiledModel(model) if isinstance(model, LanguageModel) else torch.compile(model)


def physical_cores() -> int:
    """Physical CPU cores this process may use (hyper-thread siblings counted once)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        try:
            sib = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            return len(allowed)
        cores.add(sib)
    return max(1, len(cores))


def match_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (default: :func:`physical_cores`) unless
    ``OMP_NUM_THREADS`` says otherwise; returns the count in use."""
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    torch.set_num_threads(threads or physical_cores())
    return torch.get_num_threads()


@functools.cache
def _denormals() -> ctypes.CDLL | None:
    lib = compiled(_DENORMALS, "float denormals")
    if lib is not None:
        lib.gptlab_flush_denormals.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.gptlab_denormals_flushed.argtypes = [ctypes.c_int]
    return lib


def denormals_flushed() -> int:
    """How many of the intra-op threads have flush-to-zero and denormals-are-zero set now (0 where it
    cannot be read: no native code)."""
    lib = _denormals()
    return lib.gptlab_denormals_flushed(torch.get_num_threads()) if lib is not None else 0


@contextlib.contextmanager
def flush_denormals(device: torch.device | str, on: bool = True) -> Iterator[bool]:
    """Within the block, CPU float math on every intra-op thread treats denormals (below 2^-126) as zero
    and flushes results below it to zero (MXCSR's DAZ and FTZ bits); after it the threads are put back as
    they were. Yields True where that took effect. A CUDA or MPS device and ``on=False`` change nothing
    (False). Without native code (a CPU other than x86-64, ``GPTLAB_NATIVE=0``, no C compiler)
    ``torch.set_flush_denormal`` sets the calling thread alone; it yields whether torch could.

    On x86 an operation that reads or makes a denormal takes a microcode assist, tens of times a normal
    one, and training makes more of them as the model learns (near-zero attention probabilities and their
    products, AdamW's second moments of tiny gradients). In a plain loop of the Shakespeare model at a
    constant lr 4e-3 its step drifted from ~84 to ~100 ms over 600 steps with them and stayed at ~45
    without (docs/training-speed.md, the levers table). A flushed value is below 1.2e-38."""
    if not on or torch.device(device).type != "cpu":
        yield False
        return
    lib, threads = _denormals(), torch.get_num_threads()
    if lib is None:
        took = torch.set_flush_denormal(True)  # (the calling thread; False where the CPU cannot)
        try:
            yield took
        finally:
            torch.set_flush_denormal(False)
        return
    before = lib.gptlab_flush_denormals(1, threads)
    try:
        yield True
    finally:
        lib.gptlab_flush_denormals(before, threads)
