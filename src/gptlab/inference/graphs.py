"""A captured decode step: the engine's one-token step over every slot, replayed as a CUDA graph.

On a GPU a small model's decode step is a few hundred tiny kernels; launching them from Python
costs more than running them. :class:`DecodeGraph` records the whole step (embedding, every
layer, the final norm and the output head) into a ``torch.cuda.CUDAGraph`` and replays it: one
launch a step. A graph replays fixed shapes and addresses, so the step is written for that:

- it always runs every slot of the engine's :class:`~gptlab.models.attention.SlotCache` (made with
  ``spare=True``), whatever number of sequences is decoding. An idle row sits at the cache's spare
  index, writes its keys there and its logits are dropped;
- its inputs are two buffers (token ids and positions, one per slot) filled before each replay, and
  its view of the cache (:class:`~gptlab.models.attention.StaticBatch`) reads nothing back to the host;
- the rows attend over the cache's first S positions, S the smallest of 64, 128, 256, ... (up to
  ``max_len``) that holds every row: one graph per such length, captured the first time it has been
  needed for :attr:`DecodeGraph.capture_after` steps (a short generation never pays for a capture).

The same step runs uncaptured until then, and always where ``capture`` is off (what the CPU tests
check against the engine's usual path). A step that cannot be captured warns once and sets
``failed`` (the engine then decodes with its usual slot batch). The recordings keep the weights
they read alive; a weight tensor replaced (not written into) is noticed within
:data:`CHECK_EVERY` steps and the graphs are captured again.
"""

from __future__ import annotations

import os
import warnings

import torch

from gptlab.models.attention import SlotCache, StaticBatch

__all__ = ["CHECK_EVERY", "DecodeGraph", "capture_applies", "static_applies"]

CHECK_EVERY = 16  # replays between checks that the weights are the tensors the graphs were recorded with
FIRST_LENGTH = 64  # the shortest attended length a graph is recorded for


def capture_applies(device: torch.device) -> bool:
    """Is the decode step captured on ``device``? CUDA devices, unless ``GPTLAB_CUDA_GRAPHS=0``."""
    return device.type == "cuda" and os.environ.get("GPTLAB_CUDA_GRAPHS", "1") != "0"


def static_applies(model, device: torch.device) -> bool:
    """The engine's default: the static step where it is captured, and not for a mixture of experts
    (its routing reads values back to the host, so it cannot be captured)."""
    return capture_applies(device) and not getattr(getattr(model, "cfg", None), "n_experts", 0)


class DecodeGraph:
    """One decode step over every slot of ``cache``, captured as CUDA graphs when ``capture``.

    Call it with the decoding rows' slots, next token ids and positions; it returns their float logits
    (B, V) in that order.
    """

    capture_after = 16  # uncaptured steps at an attended length before its graph is recorded

    def __init__(self, model, cache: SlotCache, capture: bool = True):
        if not cache.spare:
            raise ValueError("DecodeGraph needs a slot cache made with spare=True")
        self.model, self.cache = model, cache
        self.device = cache.k[0].device
        n = cache.max_batch
        self.capture = capture and self.device.type == "cuda"
        self.failed = False
        cuda = self.device.type == "cuda"
        self._host = torch.empty((2, n), dtype=torch.long, pin_memory=cuda)  # staging: ids, positions
        self._buf = torch.zeros((2, n), dtype=torch.long, device=self.device)
        self.ids, self.pos = self._buf[0].view(n, 1), self._buf[1].view(n, 1)  # (N, 1) each
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # length -> (graph, logits (N, V))
        self._seen: dict[int, int] = {}  # length -> uncaptured steps run at it
        self._pool = None
        self._weights: list[torch.Tensor] = []  # what the graphs read: kept alive, checked every CHECK_EVERY
        self._since_check = 0
        self.captures = self.replays = 0  # what happened, for tests and benchmarks

    def length(self, positions: list[int]) -> int:
        """The attended length for rows at ``positions``: the smallest 64 * 2^k >= every row's end."""
        need, S = max(positions) + 1, FIRST_LENGTH
        while S < need:
            S *= 2
        return min(S, self.cache.max_len)

    def __call__(self, slots: list[int], ids: list[int], positions: list[int]) -> torch.Tensor:
        n, S = self.cache.max_batch, self.length(positions)
        self._host[0].fill_(0)
        self._host[1].fill_(self.cache.max_len)  # idle rows: the spare index
        self._host[0, slots] = torch.tensor(ids, dtype=torch.long)
        self._host[1, slots] = torch.tensor(positions, dtype=torch.long)
        self._buf.copy_(self._host, non_blocking=True)
        logits = self._replay(S) if self.capture else None
        if logits is None:
            logits = self._step(S)
        B = len(slots)
        if slots == list(range(B)):
            return logits[:B].clone()  # a copy: the graph's buffer is rewritten by the next replay
        return logits[torch.tensor(slots, device=self.device)]  # (B, V)

    def _replay(self, S: int) -> torch.Tensor | None:
        """Replay length S's graph (recorded now if it is due); None: run this step uncaptured."""
        if self.graphs and self._weights_moved():
            self.graphs.clear()
            self._seen.clear()
        if S not in self.graphs:
            self._seen[S] = self._seen.get(S, 0) + 1
            if self._seen[S] <= self.capture_after or not self._record(S):
                return None
        graph, logits = self.graphs[S]
        with torch.cuda.device(self.device):
            graph.replay()
        self.replays += 1
        return logits

    def _step(self, S: int) -> torch.Tensor:
        h = self.model.features(self.ids, StaticBatch(self.cache, self.pos, S))  # (N, 1, d)
        return self.model.get_head()(h[:, -1]).float()  # (N, V)

    def _weights_moved(self) -> bool:
        """Every CHECK_EVERY replays: is some parameter or buffer no longer the tensor recorded?"""
        self._since_check += 1
        if self._since_check < CHECK_EVERY:
            return False
        self._since_check = 0
        now = [*self.model.parameters(), *self.model.buffers()]
        return len(now) != len(self._weights) or any(a is not b for a, b in zip(now, self._weights))

    def _record(self, S: int) -> bool:
        """Record length S's step; the rows' real ids and positions stay in the buffers (the warm-up and
        the capture rewrite each row's keys at its own position with the same values)."""
        try:
            with torch.cuda.device(self.device):
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up off the capture: lazy initialisations, library handles
                    self._step(S)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    logits = self._step(S)
        except Exception as e:  # noqa: BLE001 - any failure: the engine goes back to its usual step
            self.capture, self.failed = False, True
            self.graphs.clear()
            warnings.warn(f"the decode step could not be captured as a CUDA graph ({type(e).__name__}: {e}); "
                          "decoding runs uncaptured", RuntimeWarning, stacklevel=4)
            return False
        self.graphs[S] = (graph, logits)
        self._weights = [*self.model.parameters(), *self.model.buffers()]
        self.captures += 1
        return True
