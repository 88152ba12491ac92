"""Character-level tokenizer: one id per distinct character (nanoGPT's shakespeare_char).

The vocabulary is the sorted distinct characters of a training text, then
``<|endoftext|>``. It is lossless on its alphabet; a character it never saw is
an error (there is no unknown token), so build it from the text you train on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from gptlab.errors import GptlabError
from gptlab.tokenizers.base import EOT, Tokenizer, check_ids


class CharTokenizer(Tokenizer):
    """Ids ``0..len(chars)-1`` are the characters in order; ``<|endoftext|>`` comes last."""

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        """Build from a list of distinct single characters (kept in the given order)."""
        self.chars = list(chars)
        if any(not isinstance(c, str) or len(c) != 1 for c in self.chars):
            raise GptlabError("CharTokenizer needs single characters; use CharTokenizer.from_text(text)")
        if len(set(self.chars)) != len(self.chars):
            raise GptlabError("CharTokenizer characters must be distinct")
        if not self.chars:
            raise GptlabError("CharTokenizer needs at least one character; the text was empty")
        self._id = {c: i for i, c in enumerate(self.chars)}
        self.special_tokens = {EOT: len(self.chars)}
        self.eos_token = EOT
        self._pieces = self.chars + [EOT]

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """Vocabulary = the sorted distinct characters of ``text``."""
        if not text:
            raise GptlabError("cannot build a character vocabulary from empty text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def _encode_ordinary(self, text: str) -> list[int]:
        try:
            return [self._id[c] for c in text]
        except KeyError:
            bad = next(c for c in text if c not in self._id)
            raise GptlabError(f"character {bad!r} (at offset {text.index(bad)}) is not in this character "
                              f"tokenizer's {len(self.chars)}-character vocabulary; rebuild it from text "
                              "that contains it (CharTokenizer.from_text)") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Concatenate the characters of ``ids``."""
        return "".join(self._pieces[i] for i in check_ids(ids, self.vocab_size, self.kind))

    def _save_files(self, directory: Path) -> dict[str, Any]:
        return {"chars": self.chars}

    @classmethod
    def _load_dir(cls, directory: Path, meta: dict[str, Any]) -> "CharTokenizer":
        if "chars" not in meta:
            raise GptlabError(f"{directory}/gptlab_tokenizer.json has no 'chars' list; it is not a saved char tokenizer")
        return cls(meta["chars"])
