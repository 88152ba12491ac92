"""Text corpora: the built-in one, named downloads, files, folders and JSONL.

A corpus *spec* is one of:

* ``None`` or ``"builtin"`` - CPython's own documentation topics
  (``pydoc_data.topics``, about 465K characters), always available offline;
* a dataset name of kind "text" from :data:`gptlab.data.download.DATASETS`
  (``the-verdict``, ``tinyshakespeare``), downloaded once into the cache;
* a path: a text file, a directory of ``.txt`` files (sorted by name, joined
  with a blank line), or a ``.jsonl`` file whose lines have a ``"text"`` field
  (joined with a blank line).

:func:`load_corpus` returns the whole text; :func:`iter_corpus` streams it in
pieces of at most ``chunk_chars`` characters without ever holding all of it.
Files are read as UTF-8 exactly as stored (``\\r\\n`` is kept).
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Iterator

from gptlab.data.download import DATASETS, fetch_dataset
from gptlab.errors import GptlabError

BUILTIN = "builtin"
DOC_SEPARATOR = "\n\n"
ACCEPTED = ("'builtin' (CPython's doc topics, offline)",
            "a dataset name (" + ", ".join(n for n, d in DATASETS.items() if d.kind == "text") + ")",
            "a .txt file", "a directory of .txt files", "a .jsonl file with a 'text' field per line")


def builtin_corpus() -> str:
    """CPython's documentation topics (``pydoc_data.topics``), joined in sorted-key order."""
    from pydoc_data.topics import topics

    return DOC_SEPARATOR.join(topics[k] for k in sorted(topics))


def _resolve(spec: str | Path | None) -> tuple[str, list[Path]]:
    """("builtin", []), ("files", [paths...]) or ("jsonl", [path])."""
    if spec is None or str(spec) == BUILTIN:
        return BUILTIN, []
    text = str(spec)
    if text in DATASETS:
        ds = DATASETS[text]
        if ds.kind != "text":
            raise GptlabError(f"dataset {text!r} is a {ds.kind} file, not a text corpus; "
                              f"use gptlab.data.fetch_dataset({text!r}) to get its path")
        return "files", [fetch_dataset(text)]
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise GptlabError(f"directory {path} holds no .txt files; put the corpus there as .txt files")
        return "files", files
    if path.is_file():
        return ("jsonl" if path.suffix == ".jsonl" else "files"), [path]
    raise GptlabError(f"corpus {text!r} not found; accepted: " + "; ".join(ACCEPTED))


def corpus_bytes(spec: str | Path | None = None) -> int:
    """Size of the corpus in bytes (for progress bars); also checks that it exists."""
    kind, files = _resolve(spec)
    if kind == BUILTIN:
        return len(builtin_corpus().encode("utf-8"))
    return sum(p.stat().st_size for p in files)


def _read_file(path: Path, chunk_chars: int) -> Iterator[tuple[str, int]]:
    """Decode a UTF-8 file incrementally (a character split across reads is handled)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk_chars)
            pending = len(decoder.getstate()[0])  # bytes of a character left over from the last read
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise GptlabError(f"{path} is not UTF-8 text (bad byte at offset {offset - pending + e.start}); "
                                  "convert it to UTF-8 first") from None
            offset += len(raw)
            if not raw:
                return
            yield text, len(raw)


def jsonl_text(line: bytes, where: str) -> str:
    """The string ``text`` field of one JSONL line; ``where`` (``FILE line N``) names it in the error."""
    try:
        text = json.loads(line)["text"]
        if not isinstance(text, str):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise GptlabError(f"{where} is not valid JSON; each line must be one JSON object") from None
    except (KeyError, TypeError):
        raise GptlabError(f"{where} has no string 'text' field; each line must look like "
                          '{"text": "..."}') from None
    return text


def _read_jsonl(path: Path) -> Iterator[tuple[str, int]]:
    first = True
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                yield "", len(line)
                continue
            text = jsonl_text(line, f"{path} line {lineno}")
            yield ("" if first else DOC_SEPARATOR) + text, len(line)
            first = False


def iter_pieces(spec: str | Path | None = None, chunk_chars: int = 1 << 20) -> Iterator[tuple[str, int]]:
    """Stream ``(text_piece, bytes_consumed)``.

    Pieces hold at most ``chunk_chars`` characters, except that a JSONL
    document is yielded whole.
    """
    if chunk_chars < 1:
        raise GptlabError(f"chunk_chars={chunk_chars} must be >= 1")
    kind, files = _resolve(spec)
    if kind == BUILTIN:
        text = builtin_corpus()
        for i in range(0, len(text), chunk_chars):
            piece = text[i:i + chunk_chars]
            yield piece, len(piece.encode("utf-8"))
        return
    if kind == "jsonl":
        yield from _read_jsonl(files[0])
        return
    for k, path in enumerate(files):
        if k:
            yield DOC_SEPARATOR, 0
        yield from _read_file(path, chunk_chars)


def iter_corpus(spec: str | Path | None = None, chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Stream the corpus text in pieces; ``"".join(iter_corpus(s)) == load_corpus(s)``."""
    for text, _ in iter_pieces(spec, chunk_chars):
        if text:
            yield text


def load_corpus(spec: str | Path | None = None) -> str:
    """The whole text of a corpus (see the module docstring for the accepted specs).

    Raises GptlabError for a missing path, undecodable bytes or an empty corpus.
    """
    text = "".join(iter_corpus(spec))
    if not text.strip():
        raise GptlabError(f"corpus {spec or BUILTIN!r} is empty; give a file with some text in it")
    return text
