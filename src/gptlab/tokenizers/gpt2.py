"""GPT-2's byte-level BPE, run by tiktoken, built from OpenAI's two files.

``encoder.json`` maps each token (written in GPT-2's printable byte alphabet)
to its id; ``vocab.bpe`` lists the 50,000 merges in priority order. tiktoken
wants one table, ``bytes -> rank``, where the rank is both the merge priority
and the id. For GPT-2 the two agree: the 256 single bytes come first (in the
order of :func:`bytes_to_unicode`), then merge ``k`` makes the token with id
``256 + k``. We build that table from the files and check it against
``encoder.json`` so the ids equal ``tiktoken.get_encoding("gpt2")`` exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import tiktoken

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_bytes
from gptlab.tokenizers.base import EOT, Tokenizer, check_ids

# The pre-tokenizer regex of GPT-2 (tiktoken's "r50k" pattern): contractions,
# letters, numbers, other symbols (each with an optional leading space), spaces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT_ID = 50256

# Where OpenAI publishes the files, and their SHA-256 (tiktoken pins the same values).
ENCODER_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
VOCAB_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls,
    space, ...) map to ``chr(256 + n)`` in byte order, so ``" "`` is ``"Ġ"``.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def ranks_from_files(encoder_json: bytes, vocab_bpe: bytes) -> dict[bytes, int]:
    """tiktoken's ``bytes -> rank`` table from the raw contents of the two files, cross-checked."""
    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(token: str) -> bytes:
        return bytes(char_to_byte[c] for c in token)

    try:
        encoder: dict[str, int] = json.loads(encoder_json)
        lines = vocab_bpe.decode("utf-8").split("\n")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptlabError(f"encoder.json / vocab.bpe are not GPT-2 tokenizer files ({e})") from None
    merges = [ln.split(" ") for ln in lines[1:] if ln]  # line 0 is "#version: 0.2"
    ranks: dict[bytes, int] = {}
    for c in bytes_to_unicode().values():
        ranks[to_bytes(c)] = len(ranks)
    try:
        for left, right in merges:
            ranks[to_bytes(left) + to_bytes(right)] = len(ranks)
    except (ValueError, KeyError):
        raise GptlabError("vocab.bpe has a line that is not 'left right' in GPT-2's byte alphabet; "
                          "is it a GPT-2 vocab.bpe?") from None
    # Cross-check: every token's id in encoder.json equals its rank.
    for token, idx in encoder.items():
        if token == EOT:
            continue
        try:
            if ranks[to_bytes(token)] != idx:
                raise KeyError
        except KeyError:
            raise GptlabError(f"encoder.json and vocab.bpe disagree on token {token!r} (id {idx}); "
                              "use the two files from the same GPT-2 release") from None
    if len(ranks) + 1 != len(encoder):
        raise GptlabError(f"vocab.bpe gives {len(ranks)} tokens but encoder.json has {len(encoder)}; "
                          "use the two files from the same GPT-2 release")
    return ranks


class GPT2Tokenizer(Tokenizer):
    """GPT-2 BPE (50,257 ids, ``<|endoftext|>`` = 50256) backed by a tiktoken ``Encoding``."""

    kind = "gpt2"

    def __init__(self, encoder_json: bytes, vocab_bpe: bytes):
        """Build from the raw bytes of ``encoder.json`` and ``vocab.bpe``."""
        ranks = ranks_from_files(encoder_json, vocab_bpe)
        self._files = {"encoder.json": encoder_json, "vocab.bpe": vocab_bpe}
        self.special_tokens = {EOT: len(ranks)}
        self.eos_token = EOT
        self.encoding = tiktoken.Encoding(name="gptlab-gpt2", pat_str=GPT2_PATTERN,
                                          mergeable_ranks=ranks, special_tokens=self.special_tokens)

    @classmethod
    def from_dir(cls, directory: str | Path) -> "GPT2Tokenizer":
        """Load ``encoder.json`` + ``vocab.bpe`` from ``directory``."""
        directory = Path(directory)
        missing = [n for n in ("encoder.json", "vocab.bpe") if not (directory / n).is_file()]
        if missing:
            raise GptlabError(f"{directory} has no {' or '.join(missing)}; a GPT-2 tokenizer dir needs both")
        return cls((directory / "encoder.json").read_bytes(), (directory / "vocab.bpe").read_bytes())

    @classmethod
    def from_tiktoken_cache(cls) -> "GPT2Tokenizer":
        """The published GPT-2 files through tiktoken's download cache (``TIKTOKEN_CACHE_DIR``)."""
        from tiktoken.load import read_file_cached

        try:
            enc = read_file_cached(ENCODER_URL, ENCODER_SHA256)
            vocab = read_file_cached(VOCAB_URL, VOCAB_SHA256)
        except Exception as e:  # requests' connection errors, blob errors, hash mismatch
            raise GptlabError(
                f"could not fetch the GPT-2 tokenizer files ({type(e).__name__}); offline? pass a "
                "directory holding encoder.json and vocab.bpe instead of 'gpt2' (e.g. --tokenizer path/to/gpt2), "
                f"or put them in TIKTOKEN_CACHE_DIR ({ENCODER_URL}, {VOCAB_URL})") from None
        return cls(enc, vocab)

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def vocab_and_merges(self) -> tuple[list[str], list[str]]:
        """The tokens by id (in GPT-2's printable byte alphabet, end-of-text last) and the ``"a b"`` merges."""
        encoder = json.loads(self._files["encoder.json"])
        tokens = [t for t, _ in sorted(encoder.items(), key=lambda kv: kv[1])]
        lines = self._files["vocab.bpe"].decode("utf-8").split("\n")
        return tokens, [ln for ln in lines[1:] if ln]  # line 0 is "#version: 0.2"

    def encode(self, text: str, allowed_special="all") -> list[int]:
        """Token ids of ``text`` (see :meth:`Tokenizer.encode`); tiktoken does the work."""
        if not isinstance(text, str):
            raise GptlabError(f"encode() needs a str, got {type(text).__name__}; decode bytes first")
        allowed = self._allowed_set(allowed_special)
        return self.encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_array(self, text: str, allowed_special="all") -> np.ndarray:
        """Token ids as an int64 array, without building a Python list (big corpora)."""
        if not isinstance(text, str):
            raise GptlabError(f"encode() needs a str, got {type(text).__name__}; decode bytes first")
        allowed = self._allowed_set(allowed_special)
        return self.encoding.encode_to_numpy(text, allowed_special=allowed, disallowed_special=()).astype(np.int64)

    def _encode_ordinary(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; an incomplete UTF-8 sequence becomes U+FFFD."""
        return self.encoding.decode(check_ids(ids, self.vocab_size, self.kind))

    def _save_files(self, directory: Path) -> dict[str, Any]:
        for name, data in self._files.items():
            atomic_write_bytes(directory / name, data)
        return {}

    @classmethod
    def _load_dir(cls, directory: Path, meta: dict[str, Any]) -> "GPT2Tokenizer":
        return cls.from_dir(directory)
