"""What the fine-tuning recipes share: loading a model with its tokenizer, records of JSON data, seeded splits,
restoring a checkpoint. (The run directory and the resume rule are in :mod:`gptlab.training.rundir` and
:mod:`gptlab.training.settings`.)"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence, TypeVar

import torch
import torch.nn as nn

from gptlab.errors import GptlabError

T = TypeVar("T")


def load_model_and_tokenizer(ref: str | Path, device: torch.device | None = None) -> tuple[nn.Module, object]:
    """Load a pretrained model (fp32 master weights for training) and its tokenizer."""
    from gptlab.tokenizers import load_tokenizer
    from gptlab.weights import load_model

    model = load_model(ref, dtype=torch.float32, device=device)
    return model, load_tokenizer(str(ref))


def json_records(path: Path, *, jsonl: bool | None = None) -> list[tuple[str, Any]]:
    """``(where, record)`` for each record of a JSON-array file or a JSONL file (one JSON value a line).

    ``where`` names the record for error messages: ``"record N"`` in an array,
    ``"line N"`` in JSONL (the file's own line number, blank lines counted). With
    ``jsonl=None`` a file whose text starts with ``[`` is an array, anything else JSONL.
    A line that is not JSON is reported by its line number in the file.
    """
    raw = path.read_text(encoding="utf-8")
    if jsonl is None:
        jsonl = not raw.lstrip().startswith("[")
    if not jsonl:
        try:
            records = json.loads(raw)
        except json.JSONDecodeError as e:  # its line/column are the file's own
            raise GptlabError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(records, list):
            raise GptlabError(f"{path} holds a JSON {type(records).__name__}, not an array of records; "
                              "give [ {...}, ... ] or one JSON object per line (.jsonl)")
        return [(f"record {n}", r) for n, r in enumerate(records, 1)]
    out = []
    for n, line in enumerate(raw.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        try:
            out.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise GptlabError(f"{path} line {n} is not valid JSON ({e.msg} at column {e.colno}); a JSONL file "
                              "holds one JSON object per line") from None
    return out


def pad_id_of(tok) -> int:
    """Padding id: the tokenizer's pad token, else its end-of-text token (the course pads with 50256)."""
    for pid in (getattr(tok, "pad_id", None), getattr(tok, "eos_id", None)):
        if pid is not None:
            return int(pid)
    raise GptlabError("the tokenizer has neither a pad nor an end-of-text token; give one that does")


def split_fractions(items: Sequence[T], fractions: Sequence[float], *, seed: int | None = None) -> list[list[T]]:
    """Split ``items`` into consecutive parts of the given fractions (the last part takes the rest).

    With ``seed`` the items are shuffled first (seeded); without, file order is kept
    (the course's 85/10/5 instruction split).
    """
    if any(f < 0 for f in fractions) or sum(fractions) > 1.0 + 1e-9:
        raise GptlabError(f"split fractions {list(fractions)} must be >= 0 and sum to at most 1")
    items = list(items)
    if seed is not None:
        random.Random(seed).shuffle(items)
    n = len(items)
    parts, start = [], 0
    for i, f in enumerate(fractions):
        end = n if i == len(fractions) - 1 else start + int(n * f)
        parts.append(items[start:end])
        start = end
    return parts


def restore_checkpoint(model: nn.Module, run: Path) -> dict[str, Any]:
    """Load the latest checkpoint's weights of ``run`` into ``model`` (strict); return its resume state."""
    from gptlab.training.checkpoint import is_sharded, latest_checkpoint, load_resume_state, load_weights

    ck = latest_checkpoint(run)
    load_weights(model, ck)  # sharded (a multi-process run) or not
    resume_state = load_resume_state(ck, next(model.parameters()).device)
    if is_sharded(ck):
        resume_state["checkpoint"] = str(ck)
    print(f"resuming {run} at step {resume_state['step']}", flush=True)
    return resume_state
