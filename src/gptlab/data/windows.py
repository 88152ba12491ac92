"""Train/validation split and sliding windows of next-token prediction examples.

A window of ``max_length`` tokens starting at ``i`` is the input
``ids[i : i + max_length]``; its target is the same window shifted by one,
``ids[i + 1 : i + max_length + 1]``, so position ``t`` of the target is the
token that follows position ``t`` of the input. Windows start every
``stride`` tokens (``stride == max_length``: no overlap, no token predicted twice).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gptlab.errors import GptlabError


def split_text(text: str, train_ratio: float = 0.9) -> tuple[str, str]:
    """Split text at character ``int(train_ratio * len(text))`` into (train, val), as the course does."""
    if not 0.0 < train_ratio < 1.0:
        raise GptlabError(f"train_ratio={train_ratio} must be strictly between 0 and 1")
    cut = int(train_ratio * len(text))
    if cut == 0 or cut == len(text):
        raise GptlabError(f"a text of {len(text)} characters is too short to split at train_ratio={train_ratio}; "
                          "give more text")
    return text[:cut], text[cut:]


def as_token_array(token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    """A 1-D numpy view of the ids (a memmap stays a memmap; nothing is copied when avoidable)."""
    if isinstance(token_ids, torch.Tensor):
        arr = token_ids.detach().cpu().numpy()
    elif isinstance(token_ids, np.ndarray):
        arr = token_ids
    else:
        arr = np.asarray(list(token_ids), dtype=np.int64)
    if arr.ndim != 1:
        raise GptlabError(f"token ids must be a 1-D sequence, got shape {tuple(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise GptlabError(f"token ids must be integers, got dtype {arr.dtype}")
    return arr


class WindowDataset(Dataset):
    """Sliding windows over a token sequence: item ``k`` is ``(input, target)``, each ``(max_length,)`` int64.

    The course's ``GPTDatasetV1``, but over token ids (tokenize first), and
    reading windows on demand so the ids may be a large ``np.memmap``.
    """

    def __init__(self, token_ids: Sequence[int] | np.ndarray | torch.Tensor, max_length: int, stride: int):
        """Windows of ``max_length`` tokens starting every ``stride`` tokens."""
        if max_length < 1:
            raise GptlabError(f"max_length={max_length} must be >= 1")
        if stride < 1:
            raise GptlabError(f"stride={stride} must be >= 1")
        self.tokens = as_token_array(token_ids)
        n = len(self.tokens)
        if n < max_length + 1:
            raise GptlabError(f"the token sequence has {n} tokens but one window needs {max_length + 1} "
                              f"(max_length {max_length} + 1 for the shifted target); give more text "
                              "or a shorter max_length")
        self.max_length, self.stride = max_length, stride
        self.n_windows = (n - max_length - 1) // stride + 1

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.n_windows <= k < self.n_windows:
            raise IndexError(f"window {k} out of range (0..{self.n_windows - 1})")
        start = (k % self.n_windows) * self.stride
        row = torch.from_numpy(np.asarray(self.tokens[start:start + self.max_length + 1], dtype=np.int64))
        return row[:-1], row[1:]  # (max_length,), (max_length,)


def create_dataloader(token_ids: Sequence[int] | np.ndarray | torch.Tensor, batch_size: int = 4,
                      max_length: int = 256, stride: int = 128, shuffle: bool = True, drop_last: bool = True,
                      num_workers: int = 0, pin_memory: bool = False, seed: int | None = None) -> DataLoader:
    """A DataLoader of ``(inputs, targets)`` batches, each ``(batch_size, max_length)`` int64.

    Args:
        token_ids: the tokenized corpus (list, numpy array/memmap or tensor).
        batch_size: windows per batch.
        max_length: tokens per window (the context length).
        stride: distance between window starts.
        shuffle: visit windows in random order each epoch.
        drop_last: drop a final batch smaller than ``batch_size``.
        num_workers: background loader processes (0 = load in the main process).
        pin_memory: page-lock batches for faster copies to a GPU.
        seed: seed of the shuffling generator (reproducible order); None = random.
    """
    if batch_size < 1:
        raise GptlabError(f"batch_size={batch_size} must be >= 1")
    dataset = WindowDataset(token_ids, max_length, stride)
    if drop_last and len(dataset) < batch_size:
        raise GptlabError(f"only {len(dataset)} windows of {max_length} tokens but batch_size={batch_size} with "
                          "drop_last: lower the batch size or max_length, or give more text")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=pin_memory, generator=generator)
