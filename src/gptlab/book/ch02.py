"""Chapter 2 of the course: working with text data.

Word-level tokenizers built from a vocabulary, the sliding-window dataset of
input/target token chunks, and the data loader that feeds it to a model.

Full strength:
    * tokenizers: ``gptlab.load_tokenizer("gpt2")`` (and BPE training with
      ``gptlab tokenizer train``);
    * sliding windows over a long token stream: ``gptlab.training.batches.window_batches``
      and memmapped shards built by ``gptlab prepare``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

import torch
from torch.utils.data import DataLoader, Dataset

from gptlab.errors import GptlabError

# The course's word splitter: punctuation, double dashes and whitespace become
# their own pieces (the capture group keeps them in re.split's output).
_SPLIT = re.compile(r'([,.:;?_!"()\']|--|\s)')
# On decoding, no space goes before punctuation.
_SPACE_BEFORE_PUNCT = re.compile(r'\s+([,.:;?_!"()\'])')

ENDOFTEXT = "<|endoftext|>"
UNK = "<|unk|>"


def split_words(text: str) -> list[str]:
    """Split text into words and punctuation the way the course's tokenizers do."""
    return [piece.strip() for piece in _SPLIT.split(text) if piece.strip()]


def build_vocab(text: str, extra_tokens: Iterable[str] = ()) -> dict[str, int]:
    """The course's vocabulary: sorted unique pieces of ``text``, then ``extra_tokens``.

    ``build_vocab(raw_text)`` gives the 1,130-entry vocabulary of "The Verdict";
    ``build_vocab(raw_text, [ENDOFTEXT, UNK])`` the 1,132-entry one chapter 2 uses
    with :class:`SimpleTokenizerV2`.
    """
    words = sorted(set(split_words(text)))
    words.extend(t for t in extra_tokens if t not in words)
    return {w: i for i, w in enumerate(words)}


class SimpleTokenizerV1:
    """Word-level tokenizer over a fixed vocabulary (str -> id).

    Every word of the text must be in the vocabulary; :class:`SimpleTokenizerV2`
    handles unknown words. Full strength: ``gptlab.load_tokenizer("gpt2")``.
    """

    def __init__(self, vocab: dict[str, int]):
        if not isinstance(vocab, dict) or not vocab:
            raise GptlabError("SimpleTokenizerV1 needs a non-empty dict vocab {word: id}; build one with build_vocab(text)")
        self.str_to_int = dict(vocab)
        self.int_to_str = {i: s for s, i in vocab.items()}

    def _lookup(self, word: str) -> int:
        try:
            return self.str_to_int[word]
        except KeyError:
            raise GptlabError(
                f"{word!r} is not in the vocabulary; add it to the vocabulary or use SimpleTokenizerV2, "
                f"which maps unknown words to {UNK}"
            ) from None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return [self._lookup(w) for w in split_words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids: words joined by spaces, no space before punctuation."""
        try:
            text = " ".join(self.int_to_str[int(i)] for i in ids)
        except KeyError as e:
            raise GptlabError(f"token id {e.args[0]} is not in the vocabulary (0..{len(self.int_to_str) - 1})") from None
        return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


class SimpleTokenizerV2(SimpleTokenizerV1):
    """Like :class:`SimpleTokenizerV1`, but unknown words become ``<|unk|>``.

    The vocabulary must contain ``<|unk|>`` (and usually ``<|endoftext|>``, which
    the course places between unrelated texts).
    """

    def __init__(self, vocab: dict[str, int]):
        super().__init__(vocab)
        if UNK not in self.str_to_int:
            raise GptlabError(f"SimpleTokenizerV2 needs {UNK} in the vocabulary; build it with "
                              f"build_vocab(text, ['{ENDOFTEXT}', '{UNK}'])")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; words outside the vocabulary map to ``<|unk|>``."""
        unk = self.str_to_int[UNK]
        return [self.str_to_int.get(w, unk) for w in split_words(text)]


def gpt2_tokenizer(encoding_dir: str | os.PathLike | None = None):
    """The GPT-2 byte-pair tokenizer as a ``tiktoken.Encoding`` (what the course calls ``tokenizer``).

    Same as the course's ``tiktoken.get_encoding("gpt2")``. With ``encoding_dir``
    (a folder holding OpenAI's ``encoder.json`` and ``vocab.bpe``) it is built
    from those files and needs no network. Full strength: ``gptlab.load_tokenizer("gpt2")``.
    """
    import tiktoken

    if encoding_dir is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # network or cache failure inside tiktoken
            raise GptlabError(
                f"could not load the GPT-2 tokenizer ({type(e).__name__}); when offline, pass "
                "gpt2_tokenizer('DIR') with a folder holding encoder.json and vocab.bpe"
            ) from None
    d = Path(encoding_dir)
    files = [d / "vocab.bpe", d / "encoder.json"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise GptlabError(f"{d} lacks {', '.join(missing)}; put OpenAI's GPT-2 encoder.json and vocab.bpe there")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(str(files[0]), str(files[1]))
    return tiktoken.Encoding(
        name="gpt2",
        # GPT-2's pre-tokenizer pattern (the one tiktoken registers for "gpt2").
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
    )


class GPTDatasetV1(Dataset):
    """Sliding windows of ``max_length`` tokens, ``stride`` apart, with next-token targets.

    Item i is ``(ids[s:s+max_length], ids[s+1:s+max_length+1])`` with ``s = i*stride``,
    for every start ``s`` in ``range(0, n_tokens - max_length, stride)`` (the course's range).
    Full strength: ``gptlab.training.batches.window_batches``.
    """

    def __init__(self, txt: str, tokenizer, max_length: int, stride: int):
        if max_length < 1 or stride < 1:
            raise GptlabError(f"max_length={max_length} and stride={stride} must both be >= 1")
        token_ids = tokenizer.encode(txt, allowed_special={ENDOFTEXT}) if _is_tiktoken(tokenizer) else tokenizer.encode(txt)
        if len(token_ids) <= max_length:
            raise GptlabError(
                f"the text has {len(token_ids)} tokens, too few for one window of max_length={max_length} "
                "plus its shifted target; use a longer text or a smaller max_length"
            )
        self.input_ids, self.target_ids = [], []
        for start in range(0, len(token_ids) - max_length, stride):
            self.input_ids.append(torch.tensor(token_ids[start:start + max_length]))
            self.target_ids.append(torch.tensor(token_ids[start + 1:start + max_length + 1]))

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[idx], self.target_ids[idx]


def _is_tiktoken(tokenizer) -> bool:
    return type(tokenizer).__module__.startswith("tiktoken")


def create_dataloader_v1(txt: str, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                         shuffle: bool = True, drop_last: bool = True, num_workers: int = 0,
                         tokenizer=None) -> DataLoader:
    """A DataLoader of :class:`GPTDatasetV1` windows, tokenized with GPT-2's BPE (tiktoken).

    ``tokenizer`` (not in the course's signature) lets you pass an already
    loaded tokenizer, e.g. ``gpt2_tokenizer(DIR)`` when offline.
    Full strength: ``gptlab prepare`` + ``gptlab train``.
    """
    if batch_size < 1:
        raise GptlabError(f"batch_size={batch_size} must be >= 1")
    tokenizer = tokenizer if tokenizer is not None else gpt2_tokenizer()
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers)
