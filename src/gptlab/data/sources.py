"""The documents of a corpus, planned into shards that worker processes read independently.

A corpus for sharded preparation is a file or a directory (searched
recursively, in sorted path order) of:

* ``.txt`` files: one document per file; a file larger than the shard size is
  cut at line ends into byte ranges of about that size, each one document;
* ``.jsonl`` files: one document per line (its ``"text"`` field); a big file is
  cut into byte ranges at line ends, so several workers read it at once;
* ``.parquet`` files (when ``pyarrow`` is installed): one document per row of
  the ``text`` column, read one record batch at a time.

(Named corpora such as ``tinyshakespeare`` and ``builtin`` are accepted too.)

:func:`plan_shards` groups these into :class:`Piece` lists of about
``shard_bytes`` each; :func:`iter_documents` reads one piece, holding one
document at a time. The plan depends only on the file list and sizes, so a
rerun makes the same shards (which is what makes resuming possible).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from gptlab.data.corpus import BUILTIN, builtin_corpus, jsonl_text
from gptlab.data.download import DATASETS, fetch_dataset
from gptlab.errors import GptlabError

SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Piece:
    """Bytes ``[start, end)`` of one source file (``end`` None: to the end), in one shard."""

    path: str
    kind: str  # "txt" | "jsonl" | "parquet" | "builtin"
    start: int = 0
    end: int | None = None
    whole: bool = True  # the whole file (a .txt piece is then named by the file alone)

    def to_dict(self) -> dict:
        return asdict(self)


def list_sources(spec: str | Path | None) -> list[tuple[Path | None, str]]:
    """(path, kind) of every source file of ``spec`` in a fixed order; one line naming what is wrong otherwise."""
    if spec is None or str(spec) == BUILTIN:
        return [(None, "builtin")]
    text = str(spec)
    if text in DATASETS and DATASETS[text].kind == "text":
        return [(fetch_dataset(text), "txt")]
    path = Path(text).expanduser()
    if path.is_file():
        return [(path, _kind(path))]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise GptlabError(f"directory {path} holds no {', '.join(SUFFIXES)} files; put the corpus there")
        return [(p, _kind(p)) for p in files]
    raise GptlabError(f"corpus {text!r} not found; give a file, a directory of {'/'.join(SUFFIXES)} files, "
                      "'builtin' or a dataset name (" + ", ".join(n for n, d in DATASETS.items() if d.kind == "text")
                      + ")")


def _kind(path: Path) -> str:
    if path.suffix == ".parquet":
        return "parquet"
    return "jsonl" if path.suffix == ".jsonl" else "txt"


def source_fingerprint(sources: list[tuple[Path | None, str]]) -> list[list]:
    """What identifies the inputs for resuming: each file's path, size and modification time."""
    out = []
    for path, kind in sources:
        if path is None:
            out.append([BUILTIN, len(builtin_corpus()), 0])
        else:
            st = path.stat()
            out.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    return out


def plan_shards(sources: list[tuple[Path | None, str]], shard_bytes: int) -> list[list[Piece]]:
    """Group the sources into shards of about ``shard_bytes`` input bytes (big files are split)."""
    if shard_bytes < 1:
        raise GptlabError(f"shard size {shard_bytes} bytes must be at least 1")
    shards: list[list[Piece]] = []
    current: list[Piece] = []
    filled = 0
    for path, kind in sources:
        if path is None:
            shards.append([Piece(BUILTIN, "builtin")])
            continue
        size = path.stat().st_size
        if size > shard_bytes and kind in ("txt", "jsonl"):
            if current:
                shards.append(current)
                current, filled = [], 0
            for start in range(0, size, shard_bytes):
                end = min(size, start + shard_bytes)
                shards.append([Piece(str(path), kind, start, end if end < size else None, whole=False)])
            continue
        if current and filled + size > shard_bytes:
            shards.append(current)
            current, filled = [], 0
        current.append(Piece(str(path), kind))
        filled += size
    if current:
        shards.append(current)
    return shards


def _lines(path: str, start: int, end: int | None) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for every line that *starts* in ``[start, end)`` (a split line belongs to the range it starts in)."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the rest of the line that began before ``start`` (just "\n" when one ends there)
        pos = f.tell()
        while end is None or pos < end:
            line = f.readline()
            if not line:
                return
            yield pos, line
            pos += len(line)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GptlabError(f"{where} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8 first") from None


def _txt(piece: Piece, name: str) -> Iterator[tuple[str, str]]:
    if piece.whole:
        yield name, _decode(Path(piece.path).read_bytes(), piece.path)
        return
    data = b"".join(line for _, line in _lines(piece.path, piece.start, piece.end))
    if data:
        yield f"{name}@{piece.start}", _decode(data, f"{piece.path} from byte {piece.start}")


def _jsonl(piece: Piece, name: str) -> Iterator[tuple[str, str]]:
    for offset, line in _lines(piece.path, piece.start, piece.end):
        if not line.strip():
            continue
        yield f"{name}@{offset}", jsonl_text(line, f"{piece.path} at byte {offset}")


def parquet_batches(path: str, column: str = "text", batch_rows: int = 1024) -> Iterator[list]:
    """The ``column`` of a Parquet file, ``batch_rows`` rows at a time (needs ``pyarrow``)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GptlabError(f"{path} is a Parquet file, which needs pyarrow: pip install pyarrow") from None
    f = pq.ParquetFile(path)
    if column not in f.schema_arrow.names:
        raise GptlabError(f"{path} has no {column!r} column (it has {', '.join(f.schema_arrow.names)})")
    for batch in f.iter_batches(batch_size=batch_rows, columns=[column]):
        yield batch.column(0).to_pylist()


def _parquet(piece: Piece, name: str) -> Iterator[tuple[str, str]]:
    row = 0
    for texts in parquet_batches(piece.path):
        for text in texts:
            if isinstance(text, str) and text:
                yield f"{name}#{row}", text
            row += 1


def iter_documents(piece: Piece, root: str | None = None) -> Iterator[tuple[str, str]]:
    """(name, text) of each document of ``piece``; names are paths relative to ``root`` plus a locator."""
    if piece.kind == "builtin":
        yield BUILTIN, builtin_corpus()
        return
    name = str(Path(piece.path).relative_to(root)) if root and Path(piece.path).is_relative_to(root) else piece.path
    reader = {"txt": _txt, "jsonl": _jsonl, "parquet": _parquet}[piece.kind]
    yield from reader(piece, name)
