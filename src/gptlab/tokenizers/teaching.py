"""The course's teaching tokenizers: readable, tested, and slow on purpose.

* :class:`RegexWordTokenizer` - chapter 2's word-level tokenizer: split on
  punctuation and whitespace, one id per distinct word of a training text,
  ``<|unk|>`` for words it never saw. Not lossless (whitespace is dropped).
* :class:`SimpleBPE` - byte-level byte-pair encoding from scratch: start from
  the 256 bytes, repeatedly merge the most frequent adjacent pair into a new
  token. Lossless. Use :func:`gptlab.tokenizers.train_bpe` for real corpora.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from gptlab.errors import GptlabError
from gptlab.tokenizers.base import EOT, Tokenizer, check_ids

UNK = "<|unk|>"

# Chapter 2's split: punctuation, the double dash, or whitespace (kept as separate items).
WORD_SPLIT = re.compile(r'([,.:;?_!"()\']|--|\s)')


class RegexWordTokenizer(Tokenizer):
    """Word-level tokenizer: vocabulary = sorted distinct words, then ``<|endoftext|>``, ``<|unk|>``."""

    kind = "word"

    def __init__(self, words: Iterable[str]):
        """Build from a list of distinct words (ids in the given order); the two specials are appended."""
        self.words = list(words)
        if not self.words:
            raise GptlabError("RegexWordTokenizer needs at least one word; the text was empty")
        self._id = {w: i for i, w in enumerate(self.words)}
        if len(self._id) != len(self.words):
            raise GptlabError("RegexWordTokenizer words must be distinct")
        self.special_tokens = {EOT: len(self.words), UNK: len(self.words) + 1}
        self.eos_token = EOT
        self._pieces = self.words + [EOT, UNK]

    @staticmethod
    def split(text: str) -> list[str]:
        """Chapter 2's pre-tokenization: words and punctuation, whitespace dropped."""
        return [item.strip() for item in WORD_SPLIT.split(text) if item.strip()]

    @classmethod
    def from_text(cls, text: str) -> "RegexWordTokenizer":
        """Vocabulary = the sorted distinct words and punctuation marks of ``text``."""
        return cls(sorted(set(cls.split(text))))

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def _encode_ordinary(self, text: str) -> list[int]:
        unk = self.special_tokens[UNK]
        return [self._id.get(w, unk) for w in self.split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Words joined by spaces, with the space before punctuation removed."""
        text = " ".join(self._pieces[i] for i in check_ids(ids, self.vocab_size, self.kind))
        return re.sub(r'\s+([,.?!"()\'])', r"\1", text)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        return {"words": self.words}

    @classmethod
    def _load_dir(cls, directory: Path, meta: dict[str, Any]) -> "RegexWordTokenizer":
        return cls(meta["words"])


# GPT-2's pre-tokenizer idea with the standard-library ``re``: contractions, letters
# (\w minus digits and "_"), digits, other symbols (each with an optional leading
# space), then whitespace. Every character falls in one branch, so splitting is lossless.
BPE_SPLIT = re.compile(r"'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")


class SimpleBPE(Tokenizer):
    """Byte-level BPE from scratch. Ids 0..255 are bytes, merge ``k`` makes id ``256 + k``,
    special tokens come after the merges."""

    kind = "simple-bpe"

    def __init__(self, merges: Iterable[tuple[int, int]], special_tokens: Iterable[str] = (EOT,)):
        """Build from the learned merges (pairs of ids, in the order they were learned)."""
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.vocab: list[bytes] = [bytes([b]) for b in range(256)]
        self.ranks: dict[tuple[int, int], int] = {}
        for a, b in self.merges:
            if not (a < len(self.vocab) and b < len(self.vocab)):
                raise GptlabError(f"merge ({a}, {b}) uses an id that does not exist yet; the merges are corrupt")
            self.ranks[(a, b)] = len(self.vocab)
            self.vocab.append(self.vocab[a] + self.vocab[b])
        specials = list(special_tokens)
        self.special_tokens = {s: len(self.vocab) + k for k, s in enumerate(specials)}
        self.eos_token = EOT if EOT in self.special_tokens else None
        self._special_bytes = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(cls, text: str, vocab_size: int, special_tokens: Iterable[str] = (EOT,),
              min_frequency: int = 2) -> "SimpleBPE":
        """Learn merges on ``text`` until ``vocab_size`` ids (bytes + merges + specials).

        Stops early when no adjacent pair occurs ``min_frequency`` times, so the
        vocabulary can come out smaller than asked on a small text.
        """
        specials = list(special_tokens)
        n_merges = vocab_size - 256 - len(specials)
        if n_merges < 0:
            raise GptlabError(f"vocab_size={vocab_size} is too small: it must hold the 256 bytes "
                              f"+ {len(specials)} special tokens = {256 + len(specials)}")
        if not text:
            raise GptlabError("SimpleBPE.train got empty text")
        # Each distinct pre-token as a tuple of ids, with how often it occurs.
        words: dict[tuple[int, ...], int] = Counter(tuple(w.encode("utf-8")) for w in BPE_SPLIT.findall(text))
        merges: list[tuple[int, int]] = []
        for k in range(n_merges):
            pairs: Counter[tuple[int, int]] = Counter()
            for word, count in words.items():
                for pair in zip(word, word[1:]):
                    pairs[pair] += count
            if not pairs:
                break
            # Most frequent pair; ties go to the smallest pair so training is deterministic.
            best, count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
            if count < min_frequency:
                break
            new_id = 256 + k
            merges.append(best)
            words = {_merge(word, best, new_id): c for word, c in words.items()}
        return cls(merges, specials)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + len(self.special_tokens)

    def _encode_chunk(self, chunk: str) -> list[int]:
        """Apply the merges to one pre-token: always the earliest-learned pair first."""
        ids = list(chunk.encode("utf-8"))
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, len(self.vocab)))
            if pair not in self.ranks:
                break
            ids = list(_merge(tuple(ids), pair, self.ranks[pair]))
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        for chunk in BPE_SPLIT.findall(text):
            if chunk not in self._cache:
                self._cache[chunk] = self._encode_chunk(chunk)
            ids.extend(self._cache[chunk])
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Concatenate the bytes of ``ids`` and read them as UTF-8 (bad sequences become U+FFFD)."""
        ids = check_ids(ids, self.vocab_size, self.kind)
        data = b"".join(self._special_bytes[i] if i >= len(self.vocab) else self.vocab[i] for i in ids)
        return data.decode("utf-8", errors="replace")

    def _save_files(self, directory: Path) -> dict[str, Any]:
        return {"merges": [list(m) for m in self.merges], "special_tokens": list(self.special_tokens)}

    @classmethod
    def _load_dir(cls, directory: Path, meta: dict[str, Any]) -> "SimpleBPE":
        return cls([tuple(m) for m in meta["merges"]], meta.get("special_tokens", [EOT]))


def _merge(ids: tuple[int, ...], pair: tuple[int, int], new_id: int) -> tuple[int, ...]:
    """Replace every non-overlapping occurrence of ``pair`` in ``ids`` (left to right) with ``new_id``."""
    out: list[int] = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return tuple(out)
