"""Labeled texts for classification: read (text, label) rows from TSV/CSV/JSON(L), balance, split 70/10/20."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.finetune.common import json_records, split_fractions

NAMED_DATASETS = {"sms-spam"}  # balanced by default


@dataclass
class LabeledTexts:
    """Texts with integer labels; ``names[i]`` is the class name of label i."""

    texts: list[str]
    labels: list[int]
    names: list[str]

    def counts(self) -> dict[str, int]:
        return {n: sum(1 for y in self.labels if y == i) for i, n in enumerate(self.names)}


def _pick_columns(header: list[str], source: str) -> tuple[int, int]:
    lower = [h.strip().lower() for h in header]
    if "text" in lower and "label" in lower:
        return lower.index("text"), lower.index("label")
    raise GptlabError(f"{source}: the header {header} needs a 'text' and a 'label' column")


# Column names a header row of a label<TAB>text file uses: such a first row is a header, not an example.
_LABEL_NAMES = {"label", "labels", "class", "category", "target", "y", "sentiment", "type"}
_TEXT_NAMES = {"text", "message", "messages", "sms", "sentence", "content", "review", "body", "email", "x"}


def _is_header_row(first: list[str], rest: list[str]) -> bool:
    """A first line ``label<TAB>text`` whose "label" names a column and occurs in no other row."""
    if len(first) < 2:
        return False
    label, text = first[0].strip(), first[1].strip().lower()
    if label.lower() not in _LABEL_NAMES and text not in _TEXT_NAMES:
        return False
    return not any(line.split("\t", 1)[0].strip() == label for line in rest)


def read_labeled(path: str | Path) -> tuple[list[str], list[str]]:
    """Read (text, label) rows from a TSV, CSV, JSONL or JSON file; returns (texts, raw labels).

    TSV: each line is split on its FIRST tab. A header line naming ``text`` and
    ``label`` sets the column order; without one, lines are ``label<TAB>text``
    (the SMS Spam Collection layout), and a first line such as ``label<TAB>message``
    (a column name as its label, used by no other row) is skipped as a header. Quote characters are kept as text (54 SMS
    messages start with one). CSV: a header with ``text`` and ``label`` columns.
    JSONL / JSON: objects with ``text`` and ``label`` keys.
    """
    p = Path(path)
    if p.is_dir():
        raise GptlabError(f"data {p} is a directory; give a .tsv/.csv/.jsonl file inside it")
    if not p.is_file():
        raise GptlabError(f"data file {p} not found; give a .tsv/.csv/.jsonl file or a named dataset (sms-spam)")
    suffix = p.suffix.lower()
    texts, labels = [], []
    if suffix in (".tsv", ".txt", ""):
        lines = p.read_text(encoding="utf-8").splitlines()
        first = lines[0].split("\t") if lines else []
        text_col, label_col, first_line = 1, 0, 1
        if {c.strip().lower() for c in first} >= {"text", "label"}:
            text_col, label_col = _pick_columns(first, str(p))
            lines, first_line = lines[1:], 2
        elif _is_header_row(first, lines[1:]):  # e.g. "label<TAB>message": not a third class
            lines, first_line = lines[1:], 2
        for n, line in enumerate(lines, first_line):  # n: the line number in the file
            if not line.strip():
                continue
            parts = line.split("\t", 1)
            if len(parts) != 2:
                raise GptlabError(f"{p} line {n} has no TAB; TSV lines must be 'label<TAB>text'")
            texts.append(parts[text_col])
            labels.append(parts[label_col].strip())
    elif suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, row) for row in reader]  # line_num: where the row ends in the file
        if not rows:
            raise GptlabError(f"{p} is empty")
        ti, li = _pick_columns(rows[0][1], str(p))
        for n, row in rows[1:]:
            if row:
                if len(row) <= max(ti, li):
                    raise GptlabError(f"{p} line {n} has {len(row)} column(s) but the header names "
                                      f"{len(rows[0][1])}; quote fields that contain commas")
                texts.append(row[ti])
                labels.append(row[li].strip())
    elif suffix in (".jsonl", ".json"):
        for where, o in json_records(p, jsonl=suffix == ".jsonl"):
            if not isinstance(o, dict) or "text" not in o or "label" not in o:
                raise GptlabError(f"{p} {where} needs 'text' and 'label' keys")
            texts.append(str(o["text"]))
            labels.append(str(o["label"]).strip())
    else:
        raise GptlabError(f"{p}: unknown data format {suffix!r}; use .tsv, .csv, .jsonl or .json")
    if not texts:
        raise GptlabError(f"{p} holds no examples")
    return texts, labels


def class_names(raw_labels: list[str]) -> list[str]:
    """Sorted distinct labels (numerically if they are all integers): ham -> 0, spam -> 1."""
    distinct = set(raw_labels)
    try:
        return [str(x) for x in sorted(distinct, key=int)]
    except ValueError:
        return sorted(distinct)


def load_labeled(data: str | Path) -> LabeledTexts:
    """Labeled texts from a file path or a named dataset (``sms-spam``, downloaded with checksum)."""
    if str(data) in NAMED_DATASETS:
        from gptlab.data.download import fetch_dataset

        data = fetch_dataset(str(data))
    texts, raw = read_labeled(data)
    names = class_names(raw)
    if len(names) < 2:
        raise GptlabError(f"{data} has only one class ({names[0]!r}); a classifier needs at least two")
    index = {n: i for i, n in enumerate(names)}
    return LabeledTexts(texts, [index[r] for r in raw], names)


def balance(d: LabeledTexts, seed: int = 123) -> LabeledTexts:
    """Undersample every class to the size of the smallest (seeded), keeping file order otherwise."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(d.labels):
        by_class.setdefault(y, []).append(i)
    n_min = min(len(v) for v in by_class.values())
    rng = random.Random(seed)
    keep = sorted(i for idx in by_class.values() for i in rng.sample(idx, n_min))
    return LabeledTexts([d.texts[i] for i in keep], [d.labels[i] for i in keep], d.names)


@dataclass
class Splits:
    """Train/val/test parts of a labeled dataset, each as a list of (text, label)."""

    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]
    names: list[str] = field(default_factory=list)


def make_splits(d: LabeledTexts, fractions=(0.7, 0.1, 0.2), seed: int = 123) -> Splits:
    """Seeded shuffle, then consecutive 70/10/20 parts (the course's proportions)."""
    tr, va, te = split_fractions(list(zip(d.texts, d.labels)), fractions, seed=seed)
    return Splits(tr, va, te, d.names)
