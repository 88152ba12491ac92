"""What the fine-tuning recipes share: loading a model with its tokenizer, seeded splits, run settings, resuming."""

from __future__ import annotations

import inspect
import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

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


def prepare_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Create the run directory, refusing to clobber an earlier run unless ``overwrite``."""
    run = Path(out)
    if (run / "checkpoints").exists() or (run / "model").exists():
        if not overwrite:
            raise GptlabError(f"{run} already holds a run; pass --resume {run} to continue it, --out NEW_DIR "
                              "for a new one, or --overwrite to replace it")
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    return run


# ---- resuming -----------------------------------------------------------------------------------

def recorded_ref(ref: str | Path | None, keep: Iterable[str] = ()) -> str | None:
    """``ref`` as a run records it for ``--resume``: an existing local path made absolute, so the run
    resumes from any working directory; anything else (a Hub repo id, a preset, a ``pkg:`` reference,
    one of the names in ``keep``) as typed."""
    if ref is None:
        return None
    text = str(ref)
    if not text or text.startswith("pkg:") or text in set(keep):
        return text
    path = Path(text).expanduser()
    return str(path.resolve()) if path.exists() else text


# The settings file each kind of run records, and the command that resumes it (to name it in errors).
RUN_CONFIGS = {"classify_config.json": "gptlab finetune classify", "distill_config.json": "gptlab distill",
               "instruct_config.json": "gptlab finetune instruct", "train_config.yaml": "gptlab train"}
# Arguments that may differ on --resume: the stopping limit, and how/where this process runs.
_MAY_CHANGE = {"max_steps", "epochs", "device", "progress", "out", "resume", "overwrite"}


def read_run_settings(resume: str | Path, config_name: str, what: str, settings_cls: type[T], *,
                      overwrite: bool = False) -> tuple[Path, T, dict]:
    """(run directory, its settings as ``settings_cls``, the whole record) of a run to continue with ``--resume``.

    The record is ``{"settings": ..., "train": ...}`` as the run wrote it to
    ``config_name``. Every way the path can be wrong is one :class:`GptlabError`
    saying what to do.
    """
    run = Path(resume)
    if overwrite:
        raise GptlabError(f"--resume {run} continues that run and --overwrite would delete it; drop one of the two")
    if not run.is_dir():
        raise GptlabError(f"--resume {run}: no such directory; give the --out directory of an earlier {what} run")
    saved = run / config_name
    if not saved.is_file():
        other = next((cmd for name, cmd in RUN_CONFIGS.items() if (run / name).is_file()), None)
        hint = f"it was made by `{other}`; resume it with that command" if other else "check the --resume path"
        article = "an" if what[:1] in "aeiou" else "a"
        raise GptlabError(f"{run} is not {article} {what} run (no {config_name}); {hint}")
    try:
        meta = json.loads(saved.read_text())
        if not isinstance(meta.get("train"), dict):
            raise KeyError("train")
        settings = settings_cls(**meta["settings"])
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
        raise GptlabError(f"{saved} is damaged or from another gptlab version ({type(e).__name__}: {e}); "
                          "the run cannot be resumed, start a new one with --out") from None
    return run, settings, meta


def refuse_changed_settings(func: Callable, args: dict[str, Any], meta: dict, run: Path) -> None:
    """With ``--resume`` every setting but the stopping limit comes from the run; refuse one given differently.

    ``args`` are the arguments ``func`` was called with. Only its keyword settings
    are checked (the positional model/data references are read from the run), and
    one left at ``func``'s default counts as not given.
    """
    recorded = {**meta["train"], **meta["settings"]}
    params = inspect.signature(func).parameters
    limits = "/".join(_dash(n) for n in ("max_steps", "epochs") if n in params)
    for name, value in args.items():
        if name in _MAY_CHANGE or name not in recorded or name not in params:
            continue
        default = params[name].default
        if default is inspect.Parameter.empty or value is None or value == default:
            continue
        if value != recorded[name]:
            flag = _dash(name)
            raise GptlabError(f"{flag} {value} differs from the {recorded[name]!r} that {run} was started with; a "
                              f"resumed run keeps its settings (only {limits} may change): drop {flag}, "
                              "or start a new run with --out")


def _dash(name: str) -> str:
    return "--" + name.replace("_", "-")


def checkpoint_step(run: Path) -> int | None:
    """The step of the run's latest checkpoint, read from its name (``step-000020``) without loading it."""
    import re

    from gptlab.training.checkpoint import latest_checkpoint

    m = re.fullmatch(r"step-(\d+)", latest_checkpoint(run).name)
    return int(m.group(1)) if m else None


def refuse_reached_limit(run: Path, cfg, steps_per_epoch: int | None, flags: str) -> None:
    """Refuse to resume a run whose latest checkpoint is already at the (new) stopping limit of ``cfg``.

    Such a resume would train nothing (and classification would re-score every
    split). ``steps_per_epoch`` (optimizer steps) turns an ``epochs`` limit into
    steps as :func:`gptlab.training.loop.train_loop` does; when it is not known yet, an
    ``epochs`` limit is not checked. ``flags`` names the command's limit flags.
    """
    import math

    step = checkpoint_step(run)
    if step is None:
        return
    target = cfg.max_steps
    if target is None and cfg.epochs is not None and steps_per_epoch:
        target = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if target is not None and step >= target:
        epoch = f" (epoch {round(step / steps_per_epoch, 2):g})" if steps_per_epoch else ""
        raise GptlabError(f"{run} is already at step {step}{epoch}; give a larger {flags} to continue")


def resumed_train_config(recorded: dict[str, Any], *, max_steps: int | None = None, epochs: float | None = None):
    """The run's recorded :class:`TrainConfig` with only the stopping limit replaced, when a new one is given."""
    from gptlab.training.loop import TrainConfig

    try:
        cfg = TrainConfig(**recorded)
    except TypeError as e:
        raise GptlabError(f"the recorded training settings do not fit this gptlab version ({e}); "
                          "the run cannot be resumed, start a new one with --out") from None
    if max_steps is not None:
        cfg.max_steps, cfg.epochs = max_steps, None
    elif epochs is not None:
        cfg.max_steps, cfg.epochs = None, epochs
    cfg.validate()
    return cfg


def restore_checkpoint(model: nn.Module, run: Path) -> dict[str, Any]:
    """Load the latest checkpoint's weights of ``run`` into ``model`` (strict); return its resume state."""
    from safetensors.torch import load_file

    from gptlab.training.checkpoint import latest_checkpoint, load_resume_state
    from gptlab.weights.native import load_state_strict

    ck = latest_checkpoint(run)
    state = load_file(str(ck / "model.safetensors"))
    device = next(model.parameters()).device
    load_state_strict(model, {k: v.to(device) for k, v in state.items()}, str(ck / "model.safetensors"))
    model.tie_weights()
    resume_state = load_resume_state(ck, device)
    print(f"resuming {run} at step {resume_state['step']}", flush=True)
    return resume_state
