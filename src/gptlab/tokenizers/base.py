"""The one tokenizer interface every gptlab tokenizer implements.

A tokenizer turns text into integer ids and back. Every kind (GPT-2 BPE via
tiktoken, a Hugging Face ``tokenizer.json``, a character vocabulary, the
course's teaching tokenizers) answers the same calls:

    encode(text, allowed_special="all") -> list[int]
    encode_array(text)                  -> np.ndarray (int64)
    decode(ids)                         -> str
    vocab_size, eos_id, bos_id, pad_id, special_tokens, kind, chat_template
    save(dir)                           -> its files + gptlab_tokenizer.json
    load_tokenizer(dir)                 -> the same tokenizer back

``allowed_special`` decides what happens when the *text* contains the spelling
of a special token such as ``<|endoftext|>``: ``"all"`` turns every such
spelling into its special id, a set allows only those names, ``"none"``
encodes them as ordinary text (so user text cannot inject a control token).

``encode`` never adds BOS/EOS by itself: callers that want them prepend
``tok.bos_id`` or append ``tok.eos_id``, so the token stream is exactly the text.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence, Union

import numpy as np

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_json

# The file that tells load_tokenizer(dir) which class reads the directory.
META_FILE = "gptlab_tokenizer.json"
MANIFEST = META_FILE
EOT = "<|endoftext|>"

AllowedSpecial = Union[Literal["all", "none"], set, frozenset, Sequence[str]]


class Tokenizer(ABC):
    """Abstract base: text <-> ids, plus the special tokens a model needs.

    Subclasses set ``kind`` (the name stored in ``gptlab_tokenizer.json``),
    ``special_tokens`` (string -> id), ``eos_token``/``bos_token``/``pad_token``
    (strings or None) and implement ``_encode_ordinary``, ``decode``,
    ``vocab_size``, ``_save_files`` and ``_load_dir``.
    """

    kind: str = ""
    special_tokens: dict[str, int]
    eos_token: str | None = None
    bos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None

    # ---- what subclasses provide ---------------------------------------------------------

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (ordinary + special); every id is in ``range(vocab_size)``."""

    @abstractmethod
    def _encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text`` treating every character as plain text (no special tokens)."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens come back as their strings."""

    @abstractmethod
    def _save_files(self, directory: Path) -> dict[str, Any]:
        """Write this kind's own files into ``directory``; return extra fields for the meta file."""

    @classmethod
    @abstractmethod
    def _load_dir(cls, directory: Path, meta: dict[str, Any]) -> "Tokenizer":
        """Rebuild a tokenizer from a directory written by :meth:`save`."""

    # ---- shared behaviour ------------------------------------------------------------------

    def encode(self, text: str, allowed_special: AllowedSpecial = "all") -> list[int]:
        """Token ids of ``text``.

        Args:
            text: the text to encode.
            allowed_special: which special-token strings in ``text`` become their
                special id: ``"all"`` (default), ``"none"`` (they are encoded as
                ordinary characters), or a set of special-token strings.
        """
        if not isinstance(text, str):
            raise GptlabError(f"encode() needs a str, got {type(text).__name__}; decode bytes first")
        allowed = self._allowed_set(allowed_special)
        ids: list[int] = []
        for piece, is_special in split_on_specials(text, allowed):
            if is_special:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self._encode_ordinary(piece))
        return ids

    def encode_array(self, text: str, allowed_special: AllowedSpecial = "all") -> np.ndarray:
        """Like :meth:`encode` but returns an int64 numpy array."""
        return np.asarray(self.encode(text, allowed_special), dtype=np.int64)

    def _allowed_set(self, allowed_special: AllowedSpecial) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        if allowed_special == "none" or allowed_special is None:
            return set()
        if isinstance(allowed_special, (set, frozenset, list, tuple)):
            unknown = sorted(set(allowed_special) - set(self.special_tokens))
            if unknown:
                raise GptlabError(f"allowed_special names {unknown}, which are not special tokens of this "
                                  f"{self.kind} tokenizer (it has {sorted(self.special_tokens)})")
            return set(allowed_special)
        raise GptlabError(f"allowed_special must be 'all', 'none' or a set of strings, got {allowed_special!r}")

    def token_pieces(self, ids: Iterable[int]) -> list[str]:
        """The text each id stands for on its own (part of a multi-byte character shows as U+FFFD)."""
        return [self.decode([i]) for i in ids]

    def _special_id(self, token: str | None) -> int | None:
        return None if token is None else self.special_tokens.get(token)

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-text token, or None if this tokenizer has none."""
        return self._special_id(self.eos_token)

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None."""
        return self._special_id(self.bos_token)

    @property
    def pad_id(self) -> int | None:
        """Id of the padding token, or None (callers then usually pad with eos)."""
        return self._special_id(self.pad_token)

    @property
    def add_bos(self) -> bool:
        """Whether the model expects a prompt to start with BOS (Llama 2/3, Mistral); False by default."""
        return False

    def save(self, directory: str | Path) -> Path:
        """Write this tokenizer's files and ``gptlab_tokenizer.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "eos_token": self.eos_token, "bos_token": self.bos_token,
                "pad_token": self.pad_token, "chat_template": self.chat_template}
        meta.update(self._save_files(directory))
        atomic_write_json(directory / META_FILE, meta)
        return directory

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def split_on_specials(text: str, allowed: set[str]) -> Iterator[tuple[str, bool]]:
    """Yield ``(piece, is_special)`` in order; allowed specials are matched longest first."""
    if not allowed:
        yield text, False
        return
    pattern = "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True))
    pos = 0
    for m in re.finditer(pattern, text):
        if m.start() > pos:
            yield text[pos:m.start()], False
        yield m.group(0), True
        pos = m.end()
    if pos < len(text):
        yield text[pos:], False


def check_ids(ids: Iterable[int], vocab_size: int, kind: str = "") -> list[int]:
    """Ids as a list of ints, each checked to lie in ``[0, vocab_size)``."""
    out = [int(i) for i in ids]
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise GptlabError(f"token ids {bad[:5]} are outside this {kind + ' ' if kind else ''}tokenizer's "
                          f"vocabulary (0..{vocab_size - 1}); were they made by another tokenizer?")
    return out
