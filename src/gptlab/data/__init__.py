"""Corpora, sliding windows and memmapped token files.

    from gptlab.data import load_corpus, split_text, WindowDataset, create_dataloader
    text = load_corpus()                      # built-in corpus (offline)
    train, val = split_text(text, 0.9)
    loader = create_dataloader(tok.encode(train), batch_size=8, max_length=256, stride=256)

    from gptlab.data import prepare_corpus, load_prepared
    prepare_corpus("big.txt", "data/big", tokenizer="gpt2")   # bounded memory
    data = load_prepared("data/big")          # data.train / data.val: np.memmap

    from gptlab.data import prepare_sharded, Curation    # many files, worker processes, resumable
    prepare_sharded("corpus/", "data/big", workers=8, curation=Curation(dedup="near", quality=True))

See docs/data.md.
"""

from gptlab.data.corpus import builtin_corpus, iter_corpus, load_corpus
from gptlab.data.download import DATASETS, cache_dir, fetch_dataset
from gptlab.data.curate import Curation
from gptlab.data.prepare import PreparedData, TokenFile, boundary_chunks, prepare_corpus, token_dtype
from gptlab.data.shards import ShardedTokens, is_prepared, load_prepared, load_sharded, prepare_sharded

_LAZY = {"WindowDataset", "create_dataloader", "split_text"}  # gptlab.data.windows imports torch: only when used,
# so `gptlab prepare`'s worker processes start without it


def __getattr__(name: str):
    if name in _LAZY:
        from gptlab.data import windows

        return getattr(windows, name)
    raise AttributeError(f"module 'gptlab.data' has no attribute {name!r}")


__all__ = [
    "Curation", "DATASETS", "PreparedData", "ShardedTokens", "TokenFile", "WindowDataset", "boundary_chunks",
    "builtin_corpus", "cache_dir", "is_prepared", "load_sharded", "prepare_sharded",
    "create_dataloader", "fetch_dataset", "iter_corpus", "load_corpus", "load_prepared", "prepare_corpus",
    "split_text", "token_dtype",
]
