"""Tokenize a corpus of any size into memmapped token files, in bounded memory.

    prepare_corpus("big.txt", "data/big", tokenizer="path/to/gpt2")
    data = load_prepared("data/big")      # data.train, data.val: np.memmap of token ids

The output directory holds ``train.bin`` and ``val.bin`` (raw little-endian
ids, ``uint16`` when every id fits, else ``uint32``), ``meta.json`` and the
tokenizer (``gptlab_tokenizer.json`` + its files), so ``load_tokenizer(DIR)``
gives back the tokenizer the ids were made with.

Memory stays bounded: the corpus is read ``chunk_chars`` characters at a
time, each chunk is cut where no token can straddle the cut (see
:func:`boundary_chunks`), encoded, and appended to ``train.bin``. At the end
the last ``val_ratio`` of the tokens is moved to ``val.bin``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from gptlab.data.corpus import corpus_bytes, iter_corpus, iter_pieces
from gptlab.errors import GptlabError
from gptlab.fileio import atomic_path, atomic_write_json
from gptlab.tokenizers import CharTokenizer, Tokenizer, load_tokenizer, train_bpe

META = "meta.json"
FORMAT = "gptlab-tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id (< vocab_size) fits in 16 bits, else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# Unicode White_Space, what ``\s`` means in the tokenizers' regex engines (str.isspace
# differs: it also counts the separators U+001C..U+001F).
WHITE_SPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                        + "".join(chr(c) for c in range(0x2000, 0x200B)))


def _is_cut(text: str, i: int, specials: tuple[str, ...]) -> bool:
    r"""May the text be cut just before ``text[i]``?

    Only before a single space between two non-whitespace characters
    ("word| word"). No piece of the GPT-2, Llama 3 or Qwen2 split regexes runs
    across such a space (Llama 3's ``[\r\n]*`` and ``\s*[\r\n]+`` make a cut
    inside a run of whitespace unsafe), so encoding both sides separately gives
    the same ids. Never before or inside a special token, nor before the start
    of one that may complete in the next piece of text.
    """
    if not (0 < i < len(text) - 1 and text[i] == " " and text[i - 1] not in WHITE_SPACE
            and text[i + 1] not in WHITE_SPACE):
        return False
    return not any(s.startswith(text[i + 1:i + 1 + len(s)]) or
                   text.find(s, max(0, i - len(s) + 1), i + len(s)) != -1 for s in specials)


def _last_boundary(text: str, end: int, specials: tuple[str, ...] = ()) -> int:
    """The last cut position ``i < end`` (see :func:`_is_cut`), or -1."""
    i = text.rfind(" ", 1, end)
    while i > 0:
        if _is_cut(text, i, specials):
            return i
        i = text.rfind(" ", 1, i)
    return -1


def _first_boundary(text: str, start: int, specials: tuple[str, ...] = ()) -> int:
    """The first cut position ``i >= start``, or -1."""
    i = text.find(" ", start)
    while i != -1:
        if _is_cut(text, i, specials):
            return i
        i = text.find(" ", i + 1)
    return -1


def boundary_chunks(pieces: Iterable[str], chunk_chars: int, specials: Iterable[str] = (),
                    max_factor: int = 8) -> Iterator[str]:
    """Regroup text pieces into chunks of about ``chunk_chars`` characters, cut only where safe.

    ``"".join(boundary_chunks(p, n)) == "".join(p)``, and encoding the chunks one
    by one gives the same ids as encoding the whole text (pass the tokenizer's
    special-token strings as ``specials``). A stretch with no boundary is kept
    whole up to ``max_factor * chunk_chars`` characters and only then cut where
    it is (the one case where a token could be split).
    """
    specials = tuple(specials)
    buf = ""
    for piece in pieces:
        buf = buf + piece if buf else piece
        while len(buf) >= chunk_chars:
            cut = _last_boundary(buf, chunk_chars + 1, specials)
            if cut <= 0:  # none in the first chunk_chars: take the first one after it
                cut = _first_boundary(buf, 1, specials)
                if cut < 0:
                    if len(buf) < max_factor * chunk_chars:
                        break  # wait for more text
                    cut = max_factor * chunk_chars
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def _sample(data: Any, sample_chars: int, chunk_chars: int) -> Iterator[str]:
    """The first ``sample_chars`` characters of the corpus, in pieces."""
    left = sample_chars
    for piece in iter_corpus(data, min(chunk_chars, sample_chars)):
        yield piece[:left]
        left -= len(piece)
        if left <= 0:
            return


def prepare_corpus(data: str | Path | None, out: str | Path, tokenizer: str | Path | Tokenizer | None = None,
                   val_ratio: float = 0.1, chunk_chars: int = 1_000_000, vocab_size: int = 8192,
                   sample_chars: int = 5_000_000, progress: bool = True) -> dict[str, Any]:
    """Tokenize corpus ``data`` into ``out/train.bin``, ``out/val.bin``, ``out/meta.json`` + the tokenizer.

    Args:
        data: corpus spec (see :mod:`gptlab.data.corpus`): "builtin", a dataset
            name, a .txt file, a directory of .txt files or a .jsonl file.
        out: output directory (created).
        tokenizer: tokenizer spec or object. None (or "bpe") trains a byte-level
            BPE of ``vocab_size`` on the first ``sample_chars`` characters of the
            corpus; "char" builds a character vocabulary from the whole corpus.
        val_ratio: fraction of the tokens (taken from the end) that go to val.bin.
        chunk_chars: characters read and encoded at a time (bounds the memory).
        vocab_size: vocabulary of the trained tokenizer (only when ``tokenizer`` is None).
        sample_chars: how much text the tokenizer is trained on (only when ``tokenizer`` is None).
        progress: show a progress bar on stderr.

    Returns:
        The contents of ``meta.json``.
    """
    if not 0.0 <= val_ratio < 1.0:
        raise GptlabError(f"val_ratio={val_ratio} must be in [0, 1)")
    if chunk_chars < 1:
        raise GptlabError(f"chunk_chars={chunk_chars} must be >= 1")
    out = Path(out)
    total_bytes = corpus_bytes(data)  # also checks that the corpus exists
    if tokenizer is None or tokenizer == "bpe":
        tok = train_bpe(_sample(data, sample_chars, chunk_chars), vocab_size=vocab_size)
    elif tokenizer == "char":  # one streaming pass for the alphabet
        alphabet: set[str] = set()
        for piece in iter_corpus(data, chunk_chars):
            alphabet.update(piece)
        tok = CharTokenizer(sorted(alphabet))
    else:
        tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # until the new files are complete, DIR is not a prepared corpus

    from tqdm import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress,
               file=sys.stderr)
    n_chars = 0

    def pieces() -> Iterator[str]:
        nonlocal n_chars
        for text, n_bytes in iter_pieces(data, chunk_chars):
            n_chars += len(text)
            bar.update(n_bytes)
            yield text

    with atomic_path(out / "train.bin") as tmp_train:
        n_tokens = 0
        with open(tmp_train, "wb") as f:
            for chunk in boundary_chunks(pieces(), chunk_chars, specials=tok.special_tokens):
                ids = tok.encode_array(chunk)
                f.write(ids.astype(dtype).tobytes())
                n_tokens += len(ids)
        bar.close()
        if n_tokens == 0:
            raise GptlabError(f"corpus '{data}' is empty; nothing to tokenize")
        n_val = int(round(n_tokens * val_ratio))
        n_train = n_tokens - n_val
        if n_train < 1:
            raise GptlabError(f"only {n_tokens} tokens: too few to keep any for training; give more text")
        with atomic_path(out / "val.bin") as tmp_val:
            _move_tail(tmp_train, tmp_val, n_train * dtype.itemsize, chunk_chars * dtype.itemsize)
    tok.save(out)
    meta = {"format": FORMAT, "dtype": dtype.name, "train_tokens": n_train, "val_tokens": n_val,
            "tokenizer_kind": tok.kind, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "source": str(data) if data is not None else "builtin", "chars": n_chars, "bytes": total_bytes,
            "val_ratio": val_ratio}
    atomic_write_json(out / META, meta)
    return meta


def _move_tail(src: Path, dst: Path, keep_bytes: int, block: int) -> None:
    """Copy ``src[keep_bytes:]`` to ``dst`` in blocks, then truncate ``src`` to ``keep_bytes``."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fin.seek(keep_bytes)
        for data in iter(lambda: fin.read(max(block, 1 << 16)), b""):
            fout.write(data)
    os.truncate(src, keep_bytes)


class TokenFile:
    """A token file (``train.bin``/``val.bin``) as a read-only ``np.memmap``.

    ``dtype`` defaults to the one in ``meta.json`` beside the file.
    """

    def __init__(self, path: str | Path, dtype: str | np.dtype | None = None):
        """Map ``path``; nothing is read until a slice is used."""
        self.path = Path(path)
        if not self.path.is_file():
            raise GptlabError(f"{self.path} not found; run `gptlab prepare --data ... --out {self.path.parent}` first")
        if dtype is None:
            dtype = _read_meta(self.path.parent)["dtype"]
        self.dtype = np.dtype(dtype)
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise GptlabError(f"{self.path} has {size} bytes, not a whole number of {self.dtype.name} ids; "
                              "the file is truncated, run `gptlab prepare` again")
        self.array: np.ndarray = (np.memmap(self.path, dtype=self.dtype, mode="r") if size
                                  else np.empty(0, dtype=self.dtype))

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index):
        return self.array[index]

    def __array__(self, dtype=None, copy=None):
        return self.array if dtype is None else self.array.astype(dtype)


@dataclass
class PreparedData:
    """What ``gptlab prepare`` wrote: token memmaps, metadata, and where the tokenizer is."""

    directory: Path
    train: np.ndarray
    val: np.ndarray
    meta: dict[str, Any]

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the ids were made with."""
        return load_tokenizer(self.directory)


def _read_meta(directory: Path) -> dict[str, Any]:
    path = Path(directory) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise GptlabError(f"{path} not found; {directory} is not a prepared corpus "
                          f"(run `gptlab prepare --data ... --out {directory}`)") from None
    except json.JSONDecodeError as e:
        raise GptlabError(f"{path} is not valid JSON ({e}); run `gptlab prepare` again") from None
    if meta.get("format") != FORMAT or "dtype" not in meta:
        raise GptlabError(f"{path} is not a gptlab token-file description; run `gptlab prepare` again")
    return meta


def load_token_pair(directory: str | Path) -> PreparedData:
    """Open a directory written by :func:`prepare_corpus`; checks the token counts against meta.json.

    (:func:`gptlab.data.load_prepared` opens this format and the sharded one.)"""
    directory = Path(directory)
    meta = _read_meta(directory)
    train, val = TokenFile(directory / "train.bin", meta["dtype"]), TokenFile(directory / "val.bin", meta["dtype"])
    for name, tf in (("train", train), ("val", val)):
        if len(tf) != meta[f"{name}_tokens"]:
            raise GptlabError(f"{tf.path} holds {len(tf)} tokens but meta.json says {meta[f'{name}_tokens']}; "
                              "the files are from different runs, run `gptlab prepare` again")
    return PreparedData(directory, train.array, val.array, meta)
