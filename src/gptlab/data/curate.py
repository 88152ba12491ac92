"""Corpus curation: quality filters, exact and near-duplicate removal, and a report of what went.

    from gptlab.data.curate import Curation, quality_problem, Deduplicator
    cur = Curation(dedup="near", jaccard=0.8, quality=True)
    quality_problem(text, cur)                  # None, or ("min_chars", "120 < 200") naming the failed rule
    dd = Deduplicator(cur)
    dd.check("doc-7", text)                     # None (kept), or ("near_duplicate", "doc-2") naming the first copy

Every rule is language-agnostic: characters are classed by their Unicode
category (letters ``L*`` and marks ``M*``, digits ``N*``, symbols ``S*``),
"words" are whitespace-separated, so the same thresholds read Latin, Cyrillic
or Devanagari text alike. The repetition rules follow Gopher (Rae et al.
2021, appendix A): the fraction of lines that repeat an earlier line, and the
fraction of characters inside word n-grams that occur more than once.

Near-duplicates: a document's set of word ``shingle``-grams is summarized by a
MinHash of ``num_perm`` permutations (``datasketch``); an LSH index tuned to
the Jaccard ``threshold`` proposes earlier documents that may be similar, and a
candidate counts only when its estimated Jaccard similarity reaches the
threshold. The first copy (in corpus order) is kept.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gptlab.errors import GptlabError

DEDUP_MODES = ("none", "exact", "near")
EXAMPLES = 5  # removed documents named per reason in the report


@dataclass
class Curation:
    """What ``gptlab prepare`` removes. Thresholds are fractions in [0, 1]; ``None`` turns one rule off.

    Attributes:
        dedup: "none", "exact" (same content hash) or "near" (exact, then MinHash LSH near-duplicates).
        jaccard: near-duplicate threshold: word-shingle Jaccard similarity at or above it is a duplicate.
        num_perm: MinHash permutations (more: a finer similarity estimate, more memory per document).
        shingle: words per shingle for near-duplicate detection.
        quality: apply the quality rules below.
        min_chars: fewest non-whitespace characters a document may have.
        max_symbol_ratio: most of its non-whitespace characters that may be symbols (Unicode S*).
        max_digit_ratio: most that may be digits (Unicode N*).
        max_non_letter_ratio: most that may be anything but letters and marks (not L*/M*).
        max_repeated_lines: most of its non-empty lines that may repeat an earlier line.
        max_repeated_ngrams: most of its word characters that may lie in word n-grams seen twice.
        ngram: words per n-gram for ``max_repeated_ngrams``.
    """

    dedup: str = "none"
    jaccard: float = 0.8
    num_perm: int = 128
    shingle: int = 3
    quality: bool = False
    min_chars: int | None = 50
    max_symbol_ratio: float | None = 0.2
    max_digit_ratio: float | None = 0.3
    max_non_letter_ratio: float | None = 0.5
    max_repeated_lines: float | None = 0.3
    max_repeated_ngrams: float | None = 0.2
    ngram: int = 5

    def __post_init__(self):
        if self.dedup not in DEDUP_MODES:
            raise GptlabError(f"--dedup {self.dedup!r} must be one of {', '.join(DEDUP_MODES)}")
        if not 0.0 < self.jaccard <= 1.0:
            raise GptlabError(f"--jaccard {self.jaccard} must be in (0, 1], e.g. 0.8")
        for name in ("num_perm", "shingle", "ngram"):
            if getattr(self, name) < 1:
                raise GptlabError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if self.min_chars is not None and self.min_chars < 0:
            raise GptlabError(f"--min-chars {self.min_chars} must be >= 0")
        for name in ("max_symbol_ratio", "max_digit_ratio", "max_non_letter_ratio", "max_repeated_lines",
                     "max_repeated_ngrams"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise GptlabError(f"--{name.replace('_', '-')} {v} must be a fraction in [0, 1]")

    @property
    def active(self) -> bool:
        """Whether anything can be removed."""
        return self.quality or self.dedup != "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- quality
def char_ratios(text: str) -> dict[str, float]:
    """Fractions of the non-whitespace characters that are symbols, digits, and not letters/marks."""
    counts: Counter = Counter()
    for ch, k in Counter(text).items():  # count characters in C, then class the few distinct ones
        if not ch.isspace():
            counts[unicodedata.category(ch)[0]] += k
    n = sum(counts.values())
    if n == 0:
        return {"symbol": 0.0, "digit": 0.0, "non_letter": 1.0, "chars": 0}
    return {"symbol": counts["S"] / n, "digit": counts["N"] / n,
            "non_letter": 1.0 - (counts["L"] + counts["M"]) / n, "chars": n}


def repeated_line_fraction(text: str) -> float:
    """Fraction of the non-empty lines that repeat an earlier line (stripped of surrounding whitespace)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def _word_hashes(words: list[str]) -> np.ndarray:
    """CRC-32 of each word, ``(n_words,)`` uint64 (one C call per word; n-grams are combined in numpy)."""
    import zlib

    return np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))


def _gram_hashes(w: np.ndarray, n: int, bits: int = 64) -> np.ndarray:
    """A hash of each run of ``n`` consecutive word hashes, ``(len(w) - n + 1,)`` uint64 (polynomial, wrapping)."""
    h = w[:len(w) - n + 1].copy()
    with np.errstate(over="ignore"):
        for j in range(1, n):
            h = h * np.uint64(0x100000001B3) + w[j:len(w) - n + 1 + j]
    return h if bits == 64 else h & np.uint64((1 << bits) - 1)


def repeated_ngram_fraction(text: str, n: int) -> float:
    """Fraction of the word characters covered by word n-grams that occur more than once (Gopher)."""
    words = text.split()
    if len(words) < n:
        return 0.0
    grams = _gram_hashes(_word_hashes(words), n)  # (n_grams,)
    _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
    starts = np.flatnonzero(counts[inverse] > 1)
    cover = np.zeros(len(words) + 1, dtype=np.int64)  # +1 at each repeated n-gram's start, -1 after its end
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    covered = np.cumsum(cover[:-1]) > 0
    lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    return float(lengths[covered].sum() / lengths.sum())


def quality_problem(text: str, cur: Curation) -> tuple[str, str] | None:
    """The first quality rule ``text`` fails, as (rule, "measured vs limit"), or None when it passes."""
    r = char_ratios(text)
    if cur.min_chars is not None and r["chars"] < cur.min_chars:
        return "min_chars", f"{r['chars']} < {cur.min_chars} characters"
    for rule, key in (("max_symbol_ratio", "symbol"), ("max_digit_ratio", "digit"),
                      ("max_non_letter_ratio", "non_letter")):
        limit = getattr(cur, rule)
        if limit is not None and r[key] > limit:
            return rule, f"{r[key]:.3f} > {limit}"
    if cur.max_repeated_lines is not None:
        f = repeated_line_fraction(text)
        if f > cur.max_repeated_lines:
            return "max_repeated_lines", f"{f:.3f} > {cur.max_repeated_lines}"
    if cur.max_repeated_ngrams is not None:
        f = repeated_ngram_fraction(text, cur.ngram)
        if f > cur.max_repeated_ngrams:
            return "max_repeated_ngrams", f"{f:.3f} > {cur.max_repeated_ngrams}"
    return None


# ---------------------------------------------------------------- duplicates
def content_hash(text: str) -> bytes:
    """16-byte BLAKE2b digest of the UTF-8 text: equal digests mean equal documents."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def shingles(text: str, k: int) -> set[bytes]:
    """The document's set of k-word shingles (lower-cased; the whole text when it has fewer than k words)."""
    words = text.lower().split()
    if len(words) <= k:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i:i + k]).encode("utf-8") for i in range(len(words) - k + 1)}


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """32-bit hashes of the distinct k-word shingles of :func:`shingles`, computed in numpy (uint64 array)."""
    w = _word_hashes(text.lower().split())
    if len(w) <= k:
        return _gram_hashes(w, len(w), bits=32) if len(w) else np.zeros(1, dtype=np.uint64)
    return np.unique(_gram_hashes(w, k, bits=32))


SCHEME = "affine32"  # datasketch's MinHash hashing scheme (fixed, so stored signatures stay comparable)


_PERMUTATIONS: dict[int, Any] = {}


def _minhash(cur: Curation, hashvalues: np.ndarray | None = None):
    from datasketch import MinHash

    # The shingles arrive hashed (32 bits, like datasketch's default SHA-1 prefix, the same in every process) by
    # :func:`shingle_hashes`, in numpy. The permutations (seeded, so the same everywhere) are made once per
    # num_perm instead of once per document.
    if cur.num_perm not in _PERMUTATIONS:
        _PERMUTATIONS[cur.num_perm] = MinHash(num_perm=cur.num_perm, seed=1, scheme=SCHEME).permutations
    return MinHash(num_perm=cur.num_perm, seed=1, scheme=SCHEME, hashvalues=hashvalues, hashfunc=int,
                   permutations=_PERMUTATIONS[cur.num_perm])


def minhash_values(text: str, cur: Curation) -> np.ndarray:
    """The MinHash signature of ``text``'s shingles, ``(num_perm,)`` uint64 (seed fixed, so comparable)."""
    m = _minhash(cur)
    m.update_batch(shingle_hashes(text, cur.shingle).tolist())  # already hashed: hashfunc is int
    return m.hashvalues.astype(np.uint64)


@dataclass
class Report:
    """What curation removed: counts per reason and up to ``EXAMPLES`` named documents per reason."""

    documents: int = 0
    kept: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    removed_chars: int = 0
    examples: dict[str, list[dict]] = field(default_factory=dict)

    def add(self, doc: str, n_chars: int, verdict: tuple[str, str] | None) -> None:
        """Count one document: kept (``verdict`` None) or removed for (reason, detail)."""
        self.documents += 1
        if verdict is None:
            self.kept += 1
            return
        reason, detail = verdict
        self.removed[reason] = self.removed.get(reason, 0) + 1
        self.removed_chars += n_chars
        ex = self.examples.setdefault(reason, [])
        if len(ex) < EXAMPLES:
            ex.append({"document": doc, "detail": detail})

    def merge(self, other: "Report") -> None:
        """Add another report's counts (a shard's) into this one."""
        self.documents += other.documents
        self.kept += other.kept
        self.removed_chars += other.removed_chars
        for k, v in other.removed.items():
            self.removed[k] = self.removed.get(k, 0) + v
        for k, ex in other.examples.items():
            mine = self.examples.setdefault(k, [])
            mine.extend(ex[:max(0, EXAMPLES - len(mine))])

    def summary(self) -> str:
        """One line: ``curation: kept 95 of 100 documents; removed 3 exact_duplicate, 2 min_chars``."""
        gone = ", ".join(f"{v:,} {k}" for k, v in sorted(self.removed.items())) or "nothing"
        return f"curation: kept {self.kept:,} of {self.documents:,} documents; removed {gone}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        return cls(**d)


class Deduplicator:
    """Exact and near-duplicate detection over documents seen in order; keeps the first copy.

    Memory grows with the documents kept: 16 bytes per content hash, and for
    ``dedup="near"`` the LSH index (one band key per band per document) plus the
    signature (``num_perm`` × 8 bytes) used to confirm a candidate.
    """

    def __init__(self, cur: Curation):
        self.cur = cur
        self.seen: dict[bytes, str] = {}
        self.lsh = None
        self.signatures: dict[str, np.ndarray] = {}
        if cur.dedup == "near":
            from datasketch import MinHashLSH

            try:
                self.lsh = MinHashLSH(threshold=cur.jaccard, num_perm=cur.num_perm)
            except ValueError as e:  # e.g. a threshold so high that fewer than 2 bands fit
                raise GptlabError(f"--jaccard {cur.jaccard} with --num-perm {cur.num_perm}: {e}; raise --num-perm "
                                  "or lower --jaccard") from None

    def check_signature(self, doc: str, digest: bytes, hashvalues: np.ndarray | None) -> tuple[str, str] | None:
        """Record document ``doc`` unless it duplicates an earlier one; then (reason, the earlier doc's name)."""
        if self.cur.dedup == "none":
            return None
        first = self.seen.get(digest)
        if first is not None:
            return "exact_duplicate", first
        if self.lsh is not None and hashvalues is not None:
            m = _minhash(self.cur, hashvalues)
            best = None
            for cand in self.lsh.query(m):
                sim = float(np.count_nonzero(self.signatures[cand] == hashvalues)) / len(hashvalues)  # MinHash.jaccard
                if sim >= self.cur.jaccard and (best is None or sim > best[1]):
                    best = (cand, sim)
            if best is not None:
                return "near_duplicate", f"{best[0]} (Jaccard ~{best[1]:.2f})"
            self.lsh.insert(doc, m)
            self.signatures[doc] = np.asarray(hashvalues, dtype=np.uint64)  # the values only, not the object
        self.seen[digest] = doc
        return None

    def check(self, doc: str, text: str) -> tuple[str, str] | None:
        """:meth:`check_signature` of ``text`` (hash and MinHash computed here)."""
        sig = minhash_values(text, self.cur) if self.lsh is not None else None  # (num_perm,) uint64
        return self.check_signature(doc, content_hash(text), sig)
