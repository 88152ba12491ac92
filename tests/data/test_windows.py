"""Sliding windows and data loaders against the course's printed figures."""

import numpy as np
import pytest
import torch

from gptlab.data import WindowDataset, create_dataloader, split_text
from gptlab.errors import GptlabError


@pytest.fixture(scope="module")
def verdict_ids(shared_data, gpt2_tok):
    return gpt2_tok.encode((shared_data / "the-verdict.txt").read_text())


def test_first_windows_chapter_2(verdict_ids):
    ds = WindowDataset(verdict_ids, max_length=4, stride=1)
    x, y = ds[0]
    assert x.tolist() == [40, 367, 2885, 1464] and y.tolist() == [367, 2885, 1464, 1807]
    assert ds[1][0].tolist() == [367, 2885, 1464, 1807]
    assert x.dtype == torch.int64 and len(ds) == len(verdict_ids) - 4


def test_batches_chapter_2(verdict_ids):
    loader = create_dataloader(verdict_ids, batch_size=8, max_length=4, stride=4, shuffle=False)
    x, y = next(iter(loader))
    assert x.shape == y.shape == (8, 4)
    assert x[0].tolist() == [40, 367, 2885, 1464] and x[1].tolist() == [1807, 3619, 402, 271]
    assert torch.equal(x[:, 1:], y[:, :-1])  # the target is the input shifted by one


def test_train_val_loaders_chapter_5(shared_data, gpt2_tok):
    text = (shared_data / "the-verdict.txt").read_text()
    train, val = split_text(text, train_ratio=0.9)
    assert len(train) == 18_431 and train + val == text
    train_loader = create_dataloader(gpt2_tok.encode(train), batch_size=2, max_length=256, stride=256,
                                     shuffle=True, drop_last=True, seed=123)
    val_loader = create_dataloader(gpt2_tok.encode(val), batch_size=2, max_length=256, stride=256,
                                   shuffle=False, drop_last=False)
    assert (len(train_loader), len(val_loader)) == (9, 1)
    # The course prints "Training tokens: 4608, Validation tokens: 512".
    assert sum(x.numel() for x, _ in train_loader) == 4608
    assert sum(x.numel() for x, _ in val_loader) == 512


def test_seeded_shuffle_is_reproducible(verdict_ids):
    first = [x for x, _ in create_dataloader(verdict_ids, 4, 16, 16, shuffle=True, seed=7)]
    again = [x for x, _ in create_dataloader(verdict_ids, 4, 16, 16, shuffle=True, seed=7)]
    other = [x for x, _ in create_dataloader(verdict_ids, 4, 16, 16, shuffle=True, seed=8)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_memmap_and_tensor_inputs(tmp_path):
    ids = np.arange(1000, dtype=np.uint16)
    ids.tofile(tmp_path / "t.bin")
    mm = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r")
    for source in (mm, torch.arange(1000), list(range(1000))):
        ds = WindowDataset(source, max_length=10, stride=7)
        assert len(ds) == (1000 - 11) // 7 + 1
        x, y = ds[-1]
        assert x.tolist() == list(range(7 * (len(ds) - 1), 7 * (len(ds) - 1) + 10))
        assert y[-1].item() == x[-1].item() + 1


def test_errors():
    with pytest.raises(GptlabError, match=r"has 5 tokens but one window needs 9"):
        WindowDataset([1, 2, 3, 4, 5], max_length=8, stride=8)
    with pytest.raises(GptlabError, match="stride=0"):
        WindowDataset(list(range(100)), max_length=8, stride=0)
    with pytest.raises(GptlabError, match="1-D"):
        WindowDataset(np.zeros((2, 50), dtype=np.int64), max_length=8, stride=8)
    with pytest.raises(GptlabError, match=r"only 2 windows .* batch_size=4"):
        create_dataloader(list(range(20)), batch_size=4, max_length=8, stride=8)
    with pytest.raises(GptlabError, match="strictly between 0 and 1"):
        split_text("abc", 1.0)
    with pytest.raises(GptlabError, match="too short"):
        split_text("a", 0.9)
    with pytest.raises(IndexError):
        WindowDataset(list(range(20)), 8, 8)[5]
