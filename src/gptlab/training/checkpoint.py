"""Run-directory checkpoints: weights + config + tokenizer, and a resume state.

Layout of a run directory::

    RUN/train_config.yaml          resolved training settings
    RUN/metrics.jsonl              one JSON object per evaluation / log step
    RUN/loss.png, RUN/samples.txt
    RUN/model/                     the model to use (best by val loss, else latest)
    RUN/checkpoints/step-000500/   model files + state.pt (optimizer, step, RNG, ...)
    RUN/checkpoints/latest         name of the newest complete checkpoint

Each file is written atomically, and a checkpoint directory only becomes
"latest" once all its files are in place, so a crash never leaves a resume
point that is half written.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_save, atomic_write_text
from gptlab.weights.native import load_model_dir, save_model_dir

KEEP = 2  # checkpoints kept besides RUN/model


def rng_state() -> dict[str, Any]:
    """Every random generator's state that training touches (torch, numpy, python, cuda)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: Path, model, tokenizer, optimizer, state: dict[str, Any],
                    rng: dict[str, Any] | None = None) -> Path:
    """Write checkpoints/step-N (model files + state.pt), then point `latest` at it.

    ``rng`` overrides the RNG state to record (the loop passes the state from the
    start of an interrupted step, so the resumed run replays that step exactly).
    """
    ckdir = run / "checkpoints"
    name = f"step-{state['step']:06d}"
    target = ckdir / name
    save_model_dir(model, target, tokenizer)
    full = dict(state, optimizer=optimizer.state_dict(), rng=rng or rng_state())
    atomic_save(target / "state.pt", lambda p: torch.save(full, p))
    atomic_write_text(ckdir / "latest", name + "\n")
    olds = sorted(p for p in ckdir.glob("step-*") if p.is_dir() and p.name != name)
    for old in olds[:-(KEEP - 1)] if KEEP > 1 else olds:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run: Path) -> Path:
    """The newest complete checkpoint of a run, with a clear error if there is none.

    ``checkpoints/latest`` names it; when that pointer is missing (deleted by hand), the newest
    ``step-N`` directory that holds a ``state.pt`` is used.
    """
    pointer = run / "checkpoints" / "latest"
    if not pointer.is_file():
        complete = sorted(p for p in (run / "checkpoints").glob("step-*") if (p / "state.pt").is_file())
        if complete:
            return complete[-1]
        raise GptlabError(f"{run} has no checkpoint to resume from (no {pointer}); "
                          "start a new run or pass the directory of an earlier run")
    ck = run / "checkpoints" / pointer.read_text().strip()
    if not (ck / "state.pt").is_file():
        raise GptlabError(f"{ck} is incomplete (no state.pt); delete it and point {pointer} at an older step")
    return ck


def load_resume_state(ck: Path, device) -> dict[str, Any]:
    """The resume state (optimizer, RNG, counters) saved in checkpoint directory ``ck``."""
    try:
        return torch.load(ck / "state.pt", map_location=device, weights_only=False)
    except Exception as e:  # torch raises many types for a damaged pickle/zip
        raise GptlabError(f"{ck / 'state.pt'} is corrupt or truncated ({type(e).__name__}); point "
                          f"{ck.parent / 'latest'} at an older step and resume again") from None


def load_checkpoint(ck: Path, device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Model (fp32, on device) and the saved resume state of checkpoint directory ``ck``."""
    return load_model_dir(ck, device=device), load_resume_state(ck, device)
