"""Sharded token files: ``gptlab prepare --workers N`` over many files, resumable, with curation.

    prepare_sharded("corpus/", "data/big", tokenizer="gpt2", workers=8, curation=Curation(dedup="near"))
    data = load_prepared("data/big")     # data.train / data.val: ShardedTokens, memmapped shard by shard

Layout of the output directory::

    OUT/index.json             the inputs' fingerprint, and per shard: file, pieces, documents, tokens
    OUT/shard-00000.bin        token ids (uint16/uint32): the shard's train tokens, then its val tail
    OUT/shard-00000.docs.npy   int64 token offset where each document starts (then the total)
    OUT/curation.json          with curation: what was removed, and why (also printed)
    OUT/scan/shard-00000.npz   with curation: per-document hashes, MinHash signatures, quality verdicts
    OUT/gptlab_tokenizer.json  the tokenizer (+ its files)

How it runs: the corpus is planned into shards of about ``shard_bytes`` input
bytes (:func:`gptlab.data.sources.plan_shards`). With curation, worker
processes first *scan* every shard (quality verdict, content hash, MinHash),
then the main process walks the scans in corpus order and decides the
duplicates (the first copy is kept). Then workers *tokenize* the shards, each
document followed by the end-of-text id, and write each shard file
atomically; the main process rewrites ``index.json`` atomically after every
shard. A worker holds one document and one encoded chunk at a time, so memory
stays bounded whatever the corpus size (the duplicate index grows with the
number of documents, see :class:`gptlab.data.curate.Deduplicator`).

Resuming: running the same command again skips every shard the index lists
(and every scan already written); different inputs or settings are refused,
so a directory never mixes two preparations.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from gptlab.data.curate import Curation, Deduplicator, Report, content_hash, minhash_values, quality_problem
from gptlab.data.sources import Piece, iter_documents, list_sources, plan_shards, source_fingerprint
from gptlab.data.prepare import META, PreparedData, boundary_chunks, load_token_pair, token_dtype
from gptlab.errors import GptlabError
from gptlab.fileio import atomic_path, atomic_write_json
from gptlab.tokenizers import CharTokenizer, load_tokenizer, train_bpe

INDEX = "index.json"
FORMAT = "gptlab-shards"
TOKENIZER_FILE = "gptlab_tokenizer.json"


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _dtype(vocab_size: int) -> np.dtype:
    return token_dtype(vocab_size)


# ---------------------------------------------------------------- workers
_TOKENIZER: dict[str, Any] = {}


def _worker_tokenizer(out: str):
    """The tokenizer saved in ``out``, loaded once per worker process."""
    if out not in _TOKENIZER:
        _TOKENIZER[out] = load_tokenizer(out)
    return _TOKENIZER[out]


def _scan_shard(task: tuple) -> int:
    """Worker: write scan/shard-K.npz (names, quality verdicts, content hashes, MinHash) for one shard."""
    k, pieces, root, cur_dict, path = task
    cur = Curation(**cur_dict)
    names, verdicts, digests, sigs, sizes = [], [], [], [], []
    for piece in pieces:
        for name, text in iter_documents(Piece(**piece), root):
            problem = quality_problem(text, cur) if cur.quality else None
            names.append(name)
            sizes.append(len(text))
            verdicts.append("" if problem is None else f"{problem[0]}\t{problem[1]}")
            digests.append(np.frombuffer(content_hash(text), dtype=np.uint8))
            if cur.dedup == "near":
                sigs.append(minhash_values(text, cur) if problem is None else np.zeros(cur.num_perm, np.uint64))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, names=np.array(names, dtype=str), verdicts=np.array(verdicts, dtype=str),
                 sizes=np.array(sizes, dtype=np.int64),
                 digests=np.array(digests, dtype=np.uint8).reshape(-1, 16),
                 sigs=np.array(sigs, dtype=np.uint64).reshape(len(sigs), cur.num_perm if sigs else 0))
    return k


def _encode_document(tok, text: str, chunk_chars: int) -> Iterator[np.ndarray]:
    for chunk in boundary_chunks([text], chunk_chars, specials=tok.special_tokens):
        yield tok.encode_array(chunk)


def _tokenize_shard(task: tuple) -> tuple[int, dict]:
    """Worker: write shard-K.bin and shard-K.docs.npy for one shard; return its index entry."""
    k, pieces, root, out, removed, chunk_chars, val_ratio = task
    tok = _worker_tokenizer(out)
    dtype = _dtype(tok.vocab_size)
    separator = (np.array([tok.eos_id], dtype=dtype) if tok.eos_id is not None
                 else tok.encode_array("\n\n").astype(dtype))
    removed = set(removed)
    starts, n_tokens, doc = [], 0, 0
    name = shard_name(k)
    with atomic_path(Path(out) / f"{name}.bin") as tmp:
        with open(tmp, "wb") as f:
            for piece in pieces:
                for _, text in iter_documents(Piece(**piece), root):
                    if doc not in removed:
                        starts.append(n_tokens)
                        for ids in _encode_document(tok, text, chunk_chars):
                            f.write(ids.astype(dtype).tobytes())
                            n_tokens += len(ids)
                        f.write(separator.tobytes())
                        n_tokens += len(separator)
                    doc += 1
        with atomic_path(Path(out) / f"{name}.docs.npy") as tmp_docs, open(tmp_docs, "wb") as fd:
            np.save(fd, np.array(starts + [n_tokens], dtype=np.int64))
    n_val = int(round(n_tokens * val_ratio))
    return k, {"file": f"{name}.bin", "documents": len(starts), "tokens": n_tokens,
               "train_tokens": n_tokens - n_val, "val_tokens": n_val, "pieces": pieces}


class Workers:
    """Worker processes, started on first use and shared by the scan and tokenize phases (one process: inline)."""

    def __init__(self, n: int):
        self.n, self.pool = n, None

    def map(self, fn, tasks: list) -> Iterator:
        """``fn`` over ``tasks``, results as they finish."""
        if self.n <= 1 or len(tasks) <= 1:
            yield from map(fn, tasks)
            return
        if self.pool is None:  # spawn: no fork of a process that may hold threads (torch, tokenizers)
            self.pool = multiprocessing.get_context("spawn").Pool(self.n)
        yield from self.pool.imap_unordered(fn, tasks)

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate() if exc[0] is not None else self.pool.close()
            self.pool.join()


# ---------------------------------------------------------------- the main process
def _tokenizer_for(spec, plan: list[list[Piece]], root: str | None, out: Path, vocab_size: int,
                   sample_chars: int, resuming: bool):
    """The run's tokenizer: the one already saved in ``out`` when resuming, else built and saved there."""
    if resuming and (out / TOKENIZER_FILE).is_file():
        return load_tokenizer(out)

    def documents() -> Iterator[str]:
        for pieces in plan:
            for piece in pieces:
                for _, text in iter_documents(piece, root):
                    yield text

    if spec is None or spec == "bpe":
        def sample() -> Iterator[str]:
            left = sample_chars
            for text in documents():
                yield text[:left]
                left -= len(text)
                if left <= 0:
                    return
        tok = train_bpe(sample(), vocab_size=vocab_size)
    elif spec == "char":
        alphabet: set[str] = set()
        for text in documents():
            alphabet.update(text)
        tok = CharTokenizer(sorted(alphabet))
    else:
        tok = load_tokenizer(spec)
    tok.save(out)
    return tok


def _read_index(out: Path) -> dict | None:
    path = out / INDEX
    if not path.is_file():
        return None
    try:
        idx = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GptlabError(f"{path} is not valid JSON ({e}); delete {out} and run `gptlab prepare` again") from None
    if idx.get("format") != FORMAT:
        raise GptlabError(f"{path} is not a gptlab shard index; give another --out")
    return idx


def _fingerprint(sources, tokenizer, vocab_size, sample_chars, shard_bytes, chunk_chars, val_ratio,
                 cur: Curation) -> dict:
    return {"sources": source_fingerprint(sources), "tokenizer": None if tokenizer is None else str(tokenizer),
            "vocab_size": vocab_size, "sample_chars": sample_chars, "shard_bytes": shard_bytes,
            "chunk_chars": chunk_chars, "val_ratio": val_ratio, "curation": cur.to_dict()}


def _refuse_other(idx: dict, fp: dict, out: Path) -> None:
    if idx["fingerprint"] != fp:
        changed = sorted(k for k in fp if idx["fingerprint"].get(k) != fp[k])
        raise GptlabError(f"{out} holds a preparation of other inputs or settings ({', '.join(changed)} changed); "
                          f"rerun with the same ones to resume it, or give another --out")


def _curate(plan, root, out: Path, cur: Curation, workers: Workers, fp: dict, progress: bool) -> dict:
    """Scan every shard (in workers, resumable), then decide the duplicates in corpus order; write curation.json."""
    path = out / "curation.json"
    if path.is_file():
        done = json.loads(path.read_text())
        if done.get("fingerprint") == fp:
            return done
    scan = out / "scan"
    scan.mkdir(exist_ok=True)
    files = [scan / f"{shard_name(k)}.npz" for k in range(len(plan))]
    tasks = [(k, [p.to_dict() for p in plan[k]], root, cur.to_dict(), str(files[k]))
             for k in range(len(plan)) if not files[k].is_file()]
    for _ in _bar(workers.map(_scan_shard, tasks), len(tasks), "scanning", progress):
        pass
    report, dedup, removed = Report(), Deduplicator(cur), {}
    for k, f in enumerate(files):
        with np.load(f) as z:  # (each z[key] reads the array again: read each once)
            names, verdicts, digests, sigs, sizes = (z[key] for key in ("names", "verdicts", "digests", "sigs", "sizes"))
        gone = []
        for i, (name, verdict) in enumerate(zip(names, verdicts)):
            v = tuple(str(verdict).split("\t", 1)) if verdict else None
            if v is None:
                v = dedup.check_signature(str(name), digests[i].tobytes(), sigs[i] if cur.dedup == "near" else None)
            report.add(str(name), int(sizes[i]), v)
            if v is not None:
                gone.append(i)
        removed[str(k)] = gone
    done = {"fingerprint": fp, "report": report.to_dict(), "removed": removed}
    atomic_write_json(path, done)
    return done


def _bar(it: Iterator, total: int, desc: str, progress: bool) -> Iterator:
    from tqdm import tqdm

    with tqdm(total=total, unit="shard", desc=desc, disable=not progress or total == 0, file=sys.stderr) as bar:
        for x in it:
            bar.update(1)
            yield x


def _clean_temp(out: Path) -> None:
    """Drop temp files an interrupted run left behind (atomic writes never leave anything else)."""
    for d in (out, out / "scan"):
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                p.unlink(missing_ok=True)


def prepare_sharded(data: str | Path | None, out: str | Path, tokenizer: str | Path | None = None,
                    val_ratio: float = 0.1, chunk_chars: int = 1_000_000, vocab_size: int = 8192,
                    sample_chars: int = 5_000_000, workers: int = 1, shard_bytes: int = 64 << 20,
                    curation: Curation | None = None, max_shards: int | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Tokenize corpus ``data`` into sharded token files under ``out`` with worker processes; resumable.

    Args:
        data: a file, a directory of .txt/.jsonl/.parquet files, "builtin" or a dataset name.
        out: output directory; running again with the same arguments resumes it.
        tokenizer: tokenizer spec; None/"bpe" trains a BPE on the first ``sample_chars``; "char".
        val_ratio: fraction of each shard's tokens (its tail) kept for validation.
        chunk_chars: characters encoded at a time within a document.
        vocab_size, sample_chars: the trained BPE's vocabulary and sample (only without ``tokenizer``).
        workers: worker processes (1: all in this process).
        shard_bytes: input bytes per shard (bigger .txt/.jsonl files are split into several shards).
        curation: what to remove (:class:`gptlab.data.curate.Curation`); None removes nothing.
        max_shards: tokenize at most this many more shards, then return (``complete`` is then False).
        progress: progress bars on stderr.

    Returns:
        The index (``index.json``): ``shards`` (one entry each), totals, ``complete``, and ``curation``.
    """
    if not 0.0 <= val_ratio < 1.0:
        raise GptlabError(f"val_ratio={val_ratio} must be in [0, 1)")
    if workers < 1 or chunk_chars < 1:
        raise GptlabError(f"workers={workers} and chunk_chars={chunk_chars} must be at least 1")
    cur = curation or Curation()
    out = Path(out)
    sources = list_sources(data)
    root = str(Path(data).expanduser().resolve()) if data and Path(str(data)).expanduser().is_dir() else None
    if root:
        sources = [(p.resolve(), kind) for p, kind in sources]
    fp = _fingerprint(sources, tokenizer, vocab_size, sample_chars, shard_bytes, chunk_chars, val_ratio, cur)
    out.mkdir(parents=True, exist_ok=True)
    idx = _read_index(out)
    if idx is not None:
        _refuse_other(idx, fp, out)
    _clean_temp(out)
    plan = plan_shards(sources, shard_bytes)
    tok = _tokenizer_for(tokenizer, plan, root, out, vocab_size, sample_chars, resuming=idx is not None)
    if idx is None:
        idx = {"format": FORMAT, "fingerprint": fp, "complete": False, "shards": [None] * len(plan),
               "dtype": _dtype(tok.vocab_size).name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
               "tokenizer_kind": tok.kind, "source": str(data) if data is not None else "builtin"}
        atomic_write_json(out / INDEX, idx)
    t0 = time.perf_counter()
    with Workers(workers) as pool:
        removed: dict[str, list[int]] = {}
        if cur.active:
            cured = _curate(plan, root, out, cur, pool, fp, progress)
            removed, idx["curation"] = cured["removed"], cured["report"]
        t1 = time.perf_counter()
        pending = [k for k in range(len(plan)) if not _shard_done(out, idx["shards"][k], idx["dtype"])]
        tasks = [(k, [p.to_dict() for p in plan[k]], root, str(out), removed.get(str(k), []), chunk_chars,
                  val_ratio) for k in pending[:max_shards]]
        for k, entry in _bar(pool.map(_tokenize_shard, tasks), len(tasks), "tokenizing", progress):
            idx["shards"][k] = entry
            atomic_write_json(out / INDEX, idx)
    idx["seconds"] = {"curation": round(t1 - t0, 3), "tokenize": round(time.perf_counter() - t1, 3),
                      "workers": workers}  # of this call (a resumed call times only what it did)
    return _finish(out, idx)


def _shard_done(out: Path, entry: dict | None, dtype: str) -> bool:
    """Whether a shard's files are in place with the size the index gives."""
    if entry is None:
        return False
    f = out / entry["file"]
    return f.is_file() and f.stat().st_size == entry["tokens"] * np.dtype(dtype).itemsize


def _finish(out: Path, idx: dict) -> dict:
    entries = idx["shards"]
    idx["complete"] = all(_shard_done(out, e, idx["dtype"]) for e in entries)
    done = [e for e in entries if e is not None]
    for key in ("documents", "tokens", "train_tokens", "val_tokens"):
        idx[key] = sum(e[key] for e in done)
    if idx["complete"] and idx["tokens"] == 0:
        raise GptlabError(f"corpus '{idx['source']}' gave no tokens (empty, or curation removed everything: "
                          f"see {out / 'curation.json'})")
    atomic_write_json(out / INDEX, idx)
    return idx


# ---------------------------------------------------------------- reading
class ShardedTokens:
    """The train (or val) tokens of every shard as one read-only sequence, memmapped shard by shard.

    Supports ``len``, an int, a slice, and integer arrays of any shape (a batch of windows
    ``tokens[starts[:, None] + offsets]``): only the ids asked for are read.
    """

    def __init__(self, arrays: list[np.ndarray], dtype: np.dtype):
        self.arrays = [a for a in arrays if len(a)]
        self.dtype = np.dtype(dtype)
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])  # (n_shards + 1,)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _gather(self, flat: np.ndarray) -> np.ndarray:
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"token index out of range (0..{len(self) - 1})")
        which = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for s in np.unique(which):
            m = which == s
            out[m] = self.arrays[s][flat[m] - self.starts[s]]
        return out

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            return self._gather(np.arange(start, stop, step, dtype=np.int64))
        if isinstance(index, (int, np.integer)):
            i = int(index) + (len(self) if index < 0 else 0)
            return self._gather(np.array([i]))[0]
        idx = np.asarray(index, dtype=np.int64)
        return self._gather(idx.ravel()).reshape(idx.shape)


def load_sharded(directory: str | Path) -> tuple[ShardedTokens, ShardedTokens, dict]:
    """(train, val, index) of a directory written by :func:`prepare_sharded`; refuses an unfinished one."""
    directory = Path(directory)
    idx = _read_index(directory)
    if idx is None:
        raise GptlabError(f"{directory / INDEX} not found; run `gptlab prepare --workers N --out {directory}` first")
    if not idx.get("complete"):
        done = sum(_shard_done(directory, e, idx["dtype"]) for e in idx["shards"])
        raise GptlabError(f"{directory} is unfinished ({done} of {len(idx['shards'])} shards); run the same "
                          "`gptlab prepare` command again to finish it")
    train, val = [], []
    for e in idx["shards"]:
        path = directory / e["file"]
        arr = np.memmap(path, dtype=idx["dtype"], mode="r") if e["tokens"] else np.empty(0, idx["dtype"])
        if len(arr) != e["tokens"]:
            raise GptlabError(f"{path} holds {len(arr)} tokens but {INDEX} says {e['tokens']}; run the same "
                              "`gptlab prepare` again")
        train.append(arr[:e["train_tokens"]])
        val.append(arr[e["train_tokens"]:])
    return ShardedTokens(train, idx["dtype"]), ShardedTokens(val, idx["dtype"]), idx


def is_sharded(directory: str | Path) -> bool:
    """Whether ``directory`` was written by :func:`prepare_sharded`."""
    return (Path(directory) / INDEX).is_file()


def is_prepared(directory: str | Path) -> bool:
    """Whether ``directory`` holds a prepared corpus (``meta.json``, or a shard ``index.json``)."""
    directory = Path(directory)
    return directory.is_dir() and ((directory / META).is_file() or is_sharded(directory))


def load_prepared(directory: str | Path) -> PreparedData:
    """Open what ``gptlab prepare`` wrote: ``train.bin``/``val.bin`` (memmaps, counts checked against
    meta.json) or shards (``train``/``val`` are then :class:`ShardedTokens`)."""
    directory = Path(directory)
    if is_sharded(directory) and not (directory / META).is_file():
        train, val, index = load_sharded(directory)
        return PreparedData(directory, train, val, index)
    return load_token_pair(directory)


def cpu_workers() -> int:
    """The cores this process may use (what ``--workers 0`` means)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
