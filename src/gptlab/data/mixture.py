"""Data mixtures: windows drawn from several token sources by weight, per rank, reproducibly, resumable anywhere.

    specs = parse_mixture(["a.txt:0.7", "code/:0.3"])         # [("a.txt", 0.7), ("code/", 0.3)]
    mix = MixtureBatches([ids_a, ids_b], [0.7, 0.3], max_length=256, batch_size=8, seed=1, rank=0, world=1)
    x, y = mix.batch(step)                                     # (8, 256) inputs and targets
    mix.state_dict(step)                                       # windows drawn per source so far, epochs

Like every batch source of the training loop, the batch of micro-step ``i`` is
a pure function of ``(seed, i, rank, world)``, so a run resumed mid-epoch gets
exactly the batches it would have had; the checkpoint also records
:meth:`MixtureBatches.state_dict` (what was drawn from each source), and
resuming refuses a mixture that differs from the recorded one.

How a sample is placed. ``batch_size`` is the *global* batch ``B``; rank ``r``
of ``world`` reads its part ``B / world`` of it: sample ``g = i * B + r * B /
world + j`` at micro-step ``i``, so ranks read disjoint samples and together
read what one process reads (:meth:`MixtureBatches.shard` sets the part, as
for the loop's other batch sources). Samples are
grouped in blocks of ``block`` (1024); in each block source ``k`` gets exactly
its weight's share (largest-remainder rounding), in a seeded order. The ``n``-th
sample a source gives is window ``perm_e(n mod W)`` of its ``W``
non-overlapping windows, ``e = n // W`` its epoch, where ``perm_e`` is a
seeded pseudo-random permutation computed in O(1) memory (a Feistel network
with cycle walking), so even a source of billions of tokens is shuffled
without an index array.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gptlab.errors import GptlabError

BLOCK = 1024
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def parse_mixture(specs: Sequence[str]) -> list[tuple[str, float]]:
    """``["a.txt:0.7", "code/:0.3"]`` -> ``[("a.txt", 0.7), ("code/", 0.3)]``; weights normalized to sum to 1.

    A spec without ``:WEIGHT`` (or whose text after the last colon is not a number) weighs 1.
    """
    out = []
    for spec in specs:
        spec = str(spec)
        if _has_weight(spec):
            path, _, w = spec.rpartition(":")
            weight = float(w)
        else:
            path, weight = spec, 1.0
            head, _, tail = spec.rpartition(":")
            if head and not os.path.exists(spec) and os.path.exists(os.path.expanduser(head)):
                raise GptlabError(f"--data {spec}: the weight after ':' must be a number > 0, e.g. {head}:0.3 "
                                  f"(got {tail!r})")
        if not math.isfinite(weight) or weight <= 0:
            raise GptlabError(f"--data {spec}: the weight after ':' must be a number > 0, e.g. {path}:0.3")
        out.append((path, weight))
    if not out:
        raise GptlabError("give at least one --data source")
    total = sum(w for _, w in out)
    return [(p, w / total) for p, w in out]


def is_mixture(specs: str | Sequence[str] | None) -> bool:
    """Whether a --data value names a mixture (several sources, or a weighted one)."""
    if specs is None or isinstance(specs, str):
        return False
    return len(specs) > 1 or (len(specs) == 1 and _has_weight(specs[0]))


def _has_weight(spec: str) -> bool:
    path, sep, w = spec.rpartition(":")
    if not sep or Path(spec).exists():
        return False
    try:
        float(w)
        return True
    except ValueError:
        return False


def block_counts(weights: Sequence[float], block: int) -> np.ndarray:
    """Samples of each source in a block of ``block``: ``round(w * block)``, largest remainders first, sum = block."""
    w = np.asarray(weights, dtype=np.float64)
    raw = w / w.sum() * block
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:block - counts.sum()]] += 1
    return counts


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64 of ``x ^ key``: a well-mixed 64-bit hash, elementwise (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        z = (x ^ np.uint64(key & 0xFFFFFFFFFFFFFFFF)) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def feistel_permute(i: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """``perm(i)`` for a seeded pseudo-random permutation of ``range(n)``, without building it.

    A balanced Feistel network on ``2h`` bits (``4**h >= n``) is a bijection of
    ``[0, 4**h)``; cycle walking (apply again while the value is ``>= n``) makes it
    one of ``[0, n)``.
    """
    if n <= 1:
        return np.zeros_like(np.asarray(i, dtype=np.uint64))
    h = max(1, math.ceil(math.log2(n) / 2))
    half = np.uint64((1 << h) - 1)
    x = np.asarray(i, dtype=np.uint64).copy()

    def once(v: np.ndarray) -> np.ndarray:
        left, right = v >> np.uint64(h), v & half
        for r in range(rounds):
            left, right = right, left ^ (_mix(right, key * 31 + r) & half)
        return (left << np.uint64(h)) | right

    todo = np.ones(x.shape, dtype=bool)
    while todo.any():
        x[todo] = once(x[todo])
        todo = x >= np.uint64(n)
    return x.astype(np.int64)


class MixtureBatches:
    """Micro-batches of ``(inputs, targets)``, ``(batch_size / world, max_length)`` int64, from weighted sources.

    ``sources`` are 1-D token sequences (lists, arrays, memmaps,
    :class:`gptlab.data.ShardedTokens`); only the windows drawn are read. Its
    interface is the training loop's batch source (``batch``, ``fixed_batches``,
    ``epoch_of``, ``len``, ``bs``, ``tokens_per_item``).
    """

    def __init__(self, sources: Sequence, weights: Sequence[float], max_length: int, batch_size: int, *,
                 seed: int = 0, rank: int = 0, world: int = 1, block: int = BLOCK, names: Sequence[str] = ()):
        if len(sources) != len(weights) or not sources:
            raise GptlabError(f"{len(sources)} sources but {len(weights)} weights; give one weight per source")
        if batch_size < 1 or max_length < 1 or block < len(sources):
            raise GptlabError(f"batch_size={batch_size} and max_length={max_length} must be >= 1 and "
                              f"block={block} at least the number of sources")
        self.names = list(names) or [f"source {k}" for k in range(len(sources))]
        self.sources = [s if hasattr(s, "__getitem__") and not isinstance(s, list) else np.asarray(s) for s in sources]
        self.windows = []
        for name, s in zip(self.names, self.sources):
            if len(s) < max_length + 1:
                raise GptlabError(f"{name} has {len(s)} tokens but one window needs {max_length + 1}; give more "
                                  "text or a shorter context")
            self.windows.append((len(s) - 1) // max_length)
        w = np.asarray(weights, dtype=np.float64)
        self.weights = (w / w.sum()).tolist()
        self.L, self.bs, self.seed, self.block = max_length, batch_size, seed, block
        self.n = sum(self.windows)  # windows in all sources (what an "epoch" is counted in)
        self.counts = block_counts(self.weights, block)  # (n_sources,) samples per block
        self.tokens_per_item = max_length
        self.batches_per_epoch = max(1, self.n // batch_size)  # an "epoch": as many samples as windows
        self._block_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.rank, self.world = 0, 1
        self.shard(rank, world)

    def shard(self, rank: int, world: int) -> "MixtureBatches":
        """Read only part ``rank`` of ``world`` of every global batch; returns self."""
        if not 0 <= rank < world:
            raise GptlabError(f"rank {rank} must be in [0, world={world})")
        if self.bs % world:
            raise GptlabError(f"the global batch of {self.bs} does not split into {world} equal parts; "
                              f"give a batch size that {world} processes divide")
        self.rank, self.world = rank, world
        return self

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position, its rank among that source's positions) in block ``b``."""
        if b not in self._block_cache:
            if len(self._block_cache) > 8:
                self._block_cache.clear()
            order = np.repeat(np.arange(len(self.counts)), self.counts)
            rng = np.random.default_rng([self.seed, 7, b])
            src = order[rng.permutation(self.block)]
            nth = np.empty(self.block, dtype=np.int64)
            for k in range(len(self.counts)):
                where = np.flatnonzero(src == k)
                nth[where] = np.arange(len(where))
            self._block_cache[b] = (src, nth)
        return self._block_cache[b]

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, window start) of global samples ``g``."""
        b, pos = np.divmod(np.asarray(g, dtype=np.int64), self.block)
        src = np.empty(len(b), dtype=np.int64)
        nth = np.empty(len(b), dtype=np.int64)
        for blk in np.unique(b):
            m = b == blk
            s, t = self._block(int(blk))
            src[m] = s[pos[m]]
            nth[m] = blk * self.counts[s[pos[m]]] + t[pos[m]]
        starts = np.empty(len(b), dtype=np.int64)
        for k in np.unique(src):
            m = src == k
            epoch, i = np.divmod(nth[m], self.windows[k])
            for e in np.unique(epoch):
                me = epoch == e
                key = (self.seed * 1_000_003 + int(k)) * 1_000_003 + int(e)
                idx = np.flatnonzero(m)[me]
                starts[idx] = feistel_permute(i[me], self.windows[k], key) * self.L
        return src, starts

    def _fetch(self, g: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        src, starts = self.locate(g)
        rows = np.empty((len(g), self.L + 1), dtype=np.int64)
        offsets = np.arange(self.L + 1)
        for k in np.unique(src):
            m = src == k
            rows[m] = np.asarray(self.sources[k][starts[m][:, None] + offsets], dtype=np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]  # (B, L), (B, L)

    def samples(self, step: int) -> np.ndarray:
        """Global sample numbers of this rank's part of micro-batch ``step``."""
        part = self.bs // self.world
        first = step * self.bs + self.rank * part
        return np.arange(first, first + part, dtype=np.int64)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch for micro-step ``step`` (0-based)."""
        return self._fetch(self.samples(step))

    def epoch_of(self, step: int) -> float:
        return step / self.batches_per_epoch

    def fixed_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n`` whole evaluation batches (every rank the same) from the same mixture, drawn from a stream of
        their own (seed + 1)."""
        ev = MixtureBatches(self.sources, self.weights, self.L, self.bs, seed=self.seed + 1, block=self.block,
                            names=self.names)
        return [ev.batch(i) for i in range(n)]

    def drawn(self, step: int) -> list[int]:
        """Samples each source has given the *global* stream before micro-step ``step`` (all ranks)."""
        g = step * self.bs
        full, part = divmod(g, self.block)
        out = full * self.counts
        if part:
            src, _ = self._block(full)
            out = out + np.bincount(src[:part], minlength=len(self.counts))
        return [int(x) for x in out]

    def state_dict(self, step: int) -> dict:
        """What a checkpoint records about the data position at micro-step ``step``."""
        drawn = self.drawn(step)
        return {"kind": "mixture", "names": self.names, "weights": self.weights, "seed": self.seed,
                "block": self.block, "global_batch": self.bs, "micro_step": step,
                "drawn": drawn, "epochs": [d / w for d, w in zip(drawn, self.windows)]}

    def check_state(self, state: dict | None) -> None:
        """Refuse to resume a run whose recorded mixture differs from this one (names, weights, global batch)."""
        if not state or state.get("kind") != "mixture":
            return
        for key, mine in (("names", self.names), ("weights", self.weights), ("global_batch", self.bs),
                          ("block", self.block)):
            theirs = state.get(key)
            if key == "weights" and theirs is not None and np.allclose(theirs, mine):
                continue
            if theirs != mine:
                raise GptlabError(f"the checkpoint's data mixture has {key} {theirs}, this run {mine}; resume with "
                                  "the same --data sources, weights and global batch (batch size x processes)")
