"""What the fine-tuning recipes share: loading a model with its tokenizer, seeded splits, run settings."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Sequence, TypeVar

import torch
import torch.nn as nn

from gptlab.errors import GptlabError

T = TypeVar("T")


def load_tokenizer_for(ref: str | Path):
    """The tokenizer that belongs to model ``ref`` (run/model dir, HF dir, .gguf file or pkg: ref)."""
    from gptlab.tokenizers import load_tokenizer

    try:
        return load_tokenizer(str(ref))
    except GptlabError:
        from gptlab.weights import resolve

        path = resolve(ref)
        if path.is_file() and path.suffix == ".gguf":
            from gptlab.tokenizers.gguf_tokenizer import load_gguf_tokenizer

            return load_gguf_tokenizer(path)
        if path.is_dir():
            return load_tokenizer(str(path))
        raise


def load_model_and_tokenizer(ref: str | Path, device: torch.device | None = None) -> tuple[nn.Module, object]:
    """Load a pretrained model (fp32 master weights for training) and its tokenizer."""
    from gptlab.weights import load_model

    model = load_model(ref, dtype=torch.float32, device=device)
    return model, load_tokenizer_for(ref)


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


def prepare_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Create the run directory, refusing to clobber an earlier run unless ``overwrite``."""
    run = Path(out)
    if (run / "checkpoints").exists() or (run / "model").exists():
        if not overwrite:
            raise GptlabError(f"{run} already holds a run; pass --out NEW_DIR or --overwrite to replace it")
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    return run
