"""Batch sources for the training loop: the batch of step ``i`` is a pure function of ``i``.

That is what makes resume exact: a run restarted at step 500 gets the very
batch 500 it would have had, with no data-loader state to save. Shuffling uses
a fresh permutation per epoch drawn from ``(seed, epoch)``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from gptlab.errors import GptlabError

Batch = tuple[torch.Tensor, ...]


class IndexedBatches:
    """Batches of ``batch_size`` items out of ``n_items``, fetched by index.

    ``fetch(indices: LongTensor) -> tuple of tensors``. With ``shuffle`` each
    epoch visits the items in a new seeded order; ``drop_last`` drops the
    ragged final batch of an epoch (the course's default for training).
    """

    def __init__(self, n_items: int, batch_size: int, fetch: Callable[[torch.Tensor], Batch], *,
                 shuffle: bool = True, drop_last: bool = True, seed: int = 0, tokens_per_item: int = 0):
        if n_items < 1:
            raise GptlabError("the dataset has no items; give more data or a shorter window")
        if batch_size < 1:
            raise GptlabError(f"batch_size={batch_size} must be >= 1")
        if drop_last and n_items < batch_size:
            raise GptlabError(
                f"only {n_items} training examples but batch_size={batch_size} with drop_last: "
                "lower the batch size or the window length, or give more data")
        self.n, self.bs, self.fetch = n_items, batch_size, fetch
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.tokens_per_item = tokens_per_item
        self.batches_per_epoch = n_items // batch_size if drop_last else -(-n_items // batch_size)
        self._perm_epoch, self._perm = -1, None
        self.part = (0, 1)  # (rank, world): a multi-process run's rank reads its part of every batch

    def shard(self, rank: int, world: int) -> "IndexedBatches":
        """Make :meth:`batch` read only part ``rank`` of ``world`` of every (global) batch; returns self.

        The ranks' parts are disjoint and together are the batch one process would read, so N processes
        x batch b see exactly the data of 1 process x batch N*b.
        """
        if self.bs % world:
            raise GptlabError(f"the global batch of {self.bs} does not split into {world} equal parts; "
                              f"give a batch size that {world} processes divide")
        if not self.drop_last and self.n % self.bs:
            raise GptlabError("a ragged last batch cannot be split across processes; drop it (drop_last)")
        self.part = (rank, world)
        return self

    def _mine(self, rows):
        rank, world = self.part
        n = len(rows) // world
        return rows[rank * n:(rank + 1) * n]

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        epoch, j = divmod(step, self.batches_per_epoch)
        return self._order(epoch)[j * self.bs:(j + 1) * self.bs]

    def batch(self, step: int) -> Batch:
        """The batch for global step ``step`` (0-based): this rank's part of it."""
        return self.fetch(self._mine(self.indices(step)))

    def epoch_of(self, step: int) -> float:
        """Fractional epochs completed after ``step`` batches."""
        return step / self.batches_per_epoch

    def fixed_batches(self, n: int) -> list[Batch]:
        """Up to ``n`` batches spread evenly over the data, unshuffled (for evaluation)."""
        total = -(-self.n // self.bs)
        picks = np.unique(np.linspace(0, total - 1, num=min(n, total)).round().astype(int))
        return [self.fetch(torch.arange(p * self.bs, min((p + 1) * self.bs, self.n))) for p in picks]

    def __len__(self) -> int:
        return self.batches_per_epoch


def window_batches(tokens: Sequence[int] | np.ndarray | torch.Tensor, max_length: int, stride: int,
                   batch_size: int, *, shuffle: bool = True, drop_last: bool = True, seed: int = 0,
                   what: str = "training") -> IndexedBatches:
    """Sliding windows over a token sequence: input ids[i:i+L], target ids[i+1:i+L+1].

    Windows start every ``stride`` tokens (stride = max_length: no overlap). The
    token array may be a numpy memmap: windows are read on demand, never copied whole.
    """
    if isinstance(tokens, torch.Tensor):
        arr = tokens.numpy()
    elif isinstance(tokens, np.ndarray):
        arr = tokens
    else:
        arr = np.asarray(tokens, dtype=np.int64)
    n_tok = len(arr)
    if n_tok < max_length + 1:
        raise GptlabError(
            f"the {what} data has {n_tok} tokens but one window needs {max_length + 1} "
            f"(max_length {max_length} + 1 target): give more text or a shorter context")
    if stride < 1:
        raise GptlabError(f"stride={stride} must be >= 1")
    n_windows = (n_tok - max_length - 1) // stride + 1
    offsets = np.arange(max_length + 1)

    def fetch(idx: torch.Tensor) -> Batch:
        starts = idx.numpy() * stride
        rows = torch.from_numpy(np.asarray(arr[starts[:, None] + offsets], dtype=np.int64))  # (B, L+1)
        return rows[:, :-1], rows[:, 1:]

    return IndexedBatches(n_windows, batch_size, fetch, shuffle=shuffle, drop_last=drop_last,
                          seed=seed, tokens_per_item=max_length)


class RandomWindows(IndexedBatches):
    """Windows at random offsets (nanoGPT style) for large memmapped corpora.

    Offsets for step i come from a generator seeded with (seed, i), so resume is
    exact; an "epoch" is len(tokens) / max_length windows' worth of tokens.
    """

    def __init__(self, tokens: np.ndarray, max_length: int, batch_size: int, *, seed: int = 0,
                 what: str = "training"):
        n_tok = len(tokens)
        if n_tok < max_length + 1:
            raise GptlabError(f"the {what} data has {n_tok} tokens but one window needs {max_length + 1} "
                              f"(max_length {max_length} + 1 target): give more text or a shorter context")
        self.tokens, self.max_length = tokens, max_length
        self._offsets = np.arange(max_length + 1)
        super().__init__(max(batch_size, n_tok // max_length), batch_size, self._rows, shuffle=False,
                         drop_last=True, seed=seed, tokens_per_item=max_length)

    def _rows(self, starts: np.ndarray) -> Batch:
        rows = torch.from_numpy(np.asarray(self.tokens[starts[:, None] + self._offsets], dtype=np.int64))
        return rows[:, :-1], rows[:, 1:]  # (B, L), (B, L)

    def _starts(self, key: list[int]) -> np.ndarray:
        span = len(self.tokens) - self.max_length - 1
        return np.random.default_rng(key).integers(0, span + 1, size=self.bs)

    def _draw(self, key: list[int]) -> Batch:
        return self._rows(self._starts(key))

    def batch(self, step: int) -> Batch:
        return self._rows(self._mine(self._starts([self.seed, 0, step])))

    def fixed_batches(self, n: int) -> list[Batch]:
        return [self._draw([self.seed, 1, k]) for k in range(n)]
