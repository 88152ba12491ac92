"""A captured decode step: the engine's one-token step over every slot, replayed as a CUDA graph.

On a GPU a small model's decode step is a few hundred tiny kernels; launching them from Python
costs more than running them. :class:`DecodeGraph` records the whole step (embedding, every
layer, the final norm and the output head) once into a ``torch.cuda.CUDAGraph`` and replays it:
one launch a step. A graph replays fixed shapes and addresses, so the step is written for that:

- it always runs every slot of the engine's :class:`~gptlab.models.attention.SlotCache` (made with
  ``spare=True``), whatever number of sequences is decoding. An idle row sits at the cache's spare
  index, writes its keys there and its logits are dropped;
- its inputs are two buffers (token ids and positions, one per slot) filled before each replay, and
  its view of the cache (:class:`~gptlab.models.attention.StaticBatch`) reads nothing back to the host;
- every row attends over the whole cache, masked to its own position.

The same step runs uncaptured (``capture=False``: what the CPU tests check against the engine's
usual path). A step that cannot be captured (a model that routes tokens to experts, an operation
that reads a value back) warns once and runs uncaptured. Replacing a weight tensor (not writing
into it) invalidates the recording: the graph is captured again at the next step.
"""

from __future__ import annotations

import os
import warnings

import torch

from gptlab.models.attention import SlotCache, StaticBatch

__all__ = ["DecodeGraph", "graphs_apply"]


def graphs_apply(device: torch.device) -> bool:
    """Where the engine captures its decode step by default: CUDA devices, unless ``GPTLAB_CUDA_GRAPHS=0``."""
    return device.type == "cuda" and os.environ.get("GPTLAB_CUDA_GRAPHS", "1") != "0"


class DecodeGraph:
    """One decode step over every slot of ``cache``, captured as a CUDA graph when ``capture``.

    Call it with the decoding rows' slots, next token ids and positions; it returns their float logits
    (B, V) in that order.
    """

    def __init__(self, model, cache: SlotCache, capture: bool = True):
        if not cache.spare:
            raise ValueError("DecodeGraph needs a slot cache made with spare=True")
        self.model, self.cache = model, cache
        self.device = cache.k[0].device
        n = cache.max_batch
        self.ids = torch.zeros((n, 1), dtype=torch.long, device=self.device)
        self.pos = torch.full((n, 1), cache.max_len, dtype=torch.long, device=self.device)
        # a mixture of experts routes tokens by value (a host read): it runs uncaptured
        self.capture = capture and self.device.type == "cuda" and not getattr(model.cfg, "n_experts", 0)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the captured step's output buffer (N, V)
        self._weights: tuple = ()
        self.captures = self.replays = 0  # what happened, for tests and benchmarks

    def __call__(self, slots: list[int], ids: list[int], positions: list[int]) -> torch.Tensor:
        n, idle = self.cache.max_batch, self.cache.max_len
        host_ids, host_pos = [0] * n, [idle] * n
        for s, i, p in zip(slots, ids, positions):
            host_ids[s], host_pos[s] = i, p
        self.ids.copy_(torch.tensor(host_ids, dtype=torch.long).view(n, 1))
        self.pos.copy_(torch.tensor(host_pos, dtype=torch.long).view(n, 1))
        if self.capture and (self.graph is None or self._weights != self._weight_key()):
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
            logits = self.logits
        else:
            logits = self._step()
        return logits[torch.tensor(slots, device=self.device)]  # (B, V), a copy: the buffer is reused

    def _step(self) -> torch.Tensor:
        h = self.model.features(self.ids, StaticBatch(self.cache, self.pos))  # (N, 1, d)
        return self.model.get_head()(h[:, -1]).float()  # (N, V)

    def _weight_key(self) -> tuple:
        """The addresses the recording reads: every parameter and buffer of the model."""
        return tuple(t.data_ptr() for t in self.model.parameters()) + tuple(b.data_ptr() for b in self.model.buffers())

    def _capture(self) -> None:
        """Record the step with every row idle (warm-up and capture write only the spare index)."""
        ids, pos = self.ids.clone(), self.pos.clone()
        self.ids.zero_()
        self.pos.fill_(self.cache.max_len)
        self.graph = self.logits = None
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up off the capture: lazy initialisations, library handles
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self._step()
            self.graph, self._weights = graph, self._weight_key()
            self.captures += 1
        except Exception as e:  # noqa: BLE001 - any failure: the step still runs, uncaptured
            self.capture, self.graph, self.logits = False, None, None
            warnings.warn(f"the decode step could not be captured as a CUDA graph ({type(e).__name__}: {e}); "
                          "decoding runs uncaptured", RuntimeWarning, stacklevel=3)
        finally:
            self.ids.copy_(ids)
            self.pos.copy_(pos)
