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

A multi-process run (torchrun) writes *sharded* checkpoints instead, with ``torch.distributed.checkpoint``
(DCP): every rank writes its own part in parallel into ``checkpoints/.step-N.tmp/``, which rank 0 renames to
``step-N`` once all ranks are done (atomic per checkpoint)::

    step-000500/sharded/          DCP: .metadata + one __R_0.distcp file per rank (model + optimizer)
    step-000500/config.json       the model's config and tokenizer files (as in a model directory)
    step-000500/state.pt          counters and settings (rank 0)
    step-000500/rng-rank-R.pt     each rank's random generators

DCP records every tensor's global shape and each shard's place in it, so a sharded checkpoint loads into
any number of processes (2 -> 1, 1 -> 2, DDP -> FSDP) and :func:`export_model_dir` turns it into the
ordinary single-file model directory.
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
    """Model (fp32, on device) and the saved resume state of checkpoint directory ``ck`` (sharded or not)."""
    if is_sharded(ck):
        from gptlab.models import build_model
        from gptlab.weights.native import read_config

        model = load_weights(build_model(read_config(ck)).to(device), ck)
        return model, dict(load_resume_state(ck, device), checkpoint=str(ck))
    return load_model_dir(ck, device=device), load_resume_state(ck, device)


# ---- sharded checkpoints (torch.distributed.checkpoint) -------------------------------------------------

SHARDS = "sharded"


def is_sharded(ck: Path) -> bool:
    """Whether checkpoint directory ``ck`` was written by a multi-process run (DCP shards)."""
    return (Path(ck) / SHARDS / ".metadata").is_file()


def _rng_file(rank: int) -> str:
    return f"rng-rank-{rank}.pt"


def save_sharded_checkpoint(run: Path, parallel, tokenizer, optimizer, state: dict[str, Any]) -> Path:
    """Every rank calls this: write checkpoints/step-N with DCP (see the module docstring); returns its path."""
    import os

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from gptlab.training.distributed import barrier
    from gptlab.weights.native import write_model_config

    d, ckdir, name = parallel.dist, run / "checkpoints", f"step-{state['step']:06d}"
    tmp, target = ckdir / f".{name}.tmp", ckdir / name
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed run's leftover of the same step
        tmp.mkdir(parents=True)
    barrier(d)
    model_sd, optim_sd = get_state_dict(parallel.model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / SHARDS)  # every rank its shards
    torch.save(rng_state(), tmp / _rng_file(d.rank))
    if d.is_main:
        write_model_config(parallel.model, tmp, tokenizer)
        torch.save(dict(state, sharded=True, world_size=d.world, strategy=parallel.strategy), tmp / "state.pt")
    barrier(d)  # every rank's files are in place
    if d.is_main:
        if target.exists():  # the same step saved again (a final evaluation): replace it whole
            shutil.rmtree(target)
        os.rename(tmp, target)
        atomic_write_text(ckdir / "latest", name + "\n")
        _prune(ckdir, name)
    barrier(d)
    return target


def _prune(ckdir: Path, keep: str) -> None:
    olds = sorted(p for p in ckdir.glob("step-*") if p.is_dir() and p.name != keep)
    for old in olds[:-(KEEP - 1)] if KEEP > 1 else olds:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckdir.glob(".step-*.tmp"):  # half-written checkpoints of a killed run
        shutil.rmtree(stale, ignore_errors=True)


def _dcp_load(ck: Path, state: dict) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # one process loading a sharded checkpoint is what 2 -> 1 means
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=Path(ck) / SHARDS)
    except Exception as e:  # DCP raises CheckpointException / RuntimeError / KeyError for damaged shards
        raise GptlabError(f"{ck / SHARDS} is damaged or does not fit this model ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]}); point {ck.parent / 'latest'} at an older step") from None


def load_sharded_weights(model: torch.nn.Module, ck: Path) -> torch.nn.Module:
    """Fill ``model`` (whole or FSDP-sharded, any number of processes) with the weights of sharded ``ck``."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    sd = get_model_state_dict(model)
    _dcp_load(ck, {"model": sd})
    set_model_state_dict(model, sd)
    return model


def load_sharded_optimizer(model: torch.nn.Module, optimizer, ck: Path) -> None:
    """Restore ``optimizer`` (built on ``model``, whole or sharded) from sharded checkpoint ``ck``."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    _dcp_load(ck, {"model": model_sd, "optim": optim_sd})
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


def load_rank_rng(ck: Path, rank: int) -> dict[str, Any] | None:
    """Rank ``rank``'s saved random generators, or None when the run that wrote ``ck`` had fewer ranks."""
    path = Path(ck) / _rng_file(rank)
    return torch.load(path, weights_only=False) if path.is_file() else None


def load_weights(model: torch.nn.Module, ck: Path) -> torch.nn.Module:
    """Replace ``model``'s weights by checkpoint ``ck``'s, sharded or not (strictly checked)."""
    from gptlab.weights.native import load_weights_into

    if is_sharded(ck):
        load_sharded_weights(model, ck)
        model.tie_weights()
        return model
    return load_weights_into(model, ck)


def export_model_dir(ck: Path, out: Path, device="cpu") -> Path:
    """Write sharded checkpoint ``ck`` as the ordinary single-file model directory ``out`` (what generate,
    serve and export load). A plain language model only: a classifier or LoRA run's ``RUN/model`` is
    already written in that form at every evaluation."""
    from gptlab.models import build_model
    from gptlab.tokenizers import load_tokenizer
    from gptlab.weights.native import read_config, save_model_dir

    model = build_model(read_config(ck)).to(device)
    load_weights(model, ck)
    try:
        tok = load_tokenizer(str(ck))
    except GptlabError:  # a checkpoint saved without a tokenizer
        tok = None
    return save_model_dir(model, out, tok)
