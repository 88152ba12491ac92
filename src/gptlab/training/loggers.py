"""Experiment loggers beside ``metrics.jsonl``: CSV, TensorBoard, Weights & Biases.

``--logger csv|tensorboard|wandb`` (several allowed) on ``gptlab train`` and every fine-tuning recipe
sends each evaluation's record (the same dict ``metrics.jsonl`` gets) to these too:

- ``csv``: ``RUN/metrics.csv``, one row per evaluation, rewritten atomically like ``metrics.jsonl``;
- ``tensorboard``: event files in ``RUN/tensorboard/`` through ``torch.utils.tensorboard`` (needs the
  ``tensorboard`` package): ``train_loss`` becomes the scalar ``train/loss``, ``val_accuracy``
  ``val/accuracy``, the rest keep their names; a resumed run purges the steps after its checkpoint;
- ``wandb``: a Weights & Biases run in ``RUN/wandb/`` (needs ``wandb``, which gptlab does not
  install). Without an API key (``WANDB_API_KEY`` or ``wandb login``) it runs offline;
  ``WANDB_MODE`` / ``WANDB_PROJECT`` are honoured. The run id is kept in ``RUN/wandb-id`` so
  ``--resume`` continues the same W&B run.

Only the main rank opens loggers (:func:`open_loggers` with ``is_main=False`` opens none).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import netrc
import os
from pathlib import Path
from typing import Any, Iterable, Literal, Protocol

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_text
from gptlab.logs import get_logger

LoggerName = Literal["csv", "tensorboard", "wandb"]
LOGGERS: tuple[str, ...] = ("csv", "tensorboard", "wandb")

log = get_logger(__name__)


class MetricsLogger(Protocol):
    """Where evaluation records go besides ``metrics.jsonl``."""

    def log(self, record: dict[str, Any]) -> None:
        """One evaluation's record (``step``, ``train_loss``, ``val_loss``, ``lr``, ...)."""

    def close(self) -> None:
        """Flush and release files."""


def scalar_tag(key: str) -> str:
    """A record key as a grouped scalar name: ``train_loss`` -> ``train/loss``, ``lr`` -> ``lr``."""
    for split in ("train", "val"):
        if key.startswith(split + "_"):
            return f"{split}/{key[len(split) + 1:]}"
    return key


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a record (not ``step``; ``None``, e.g. no validation set, left out)."""
    return {scalar_tag(k): float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class CsvLogger:
    """``RUN/metrics.csv``: a header with every key seen, one row per evaluation."""

    def __init__(self, run: Path, previous: list[dict]):
        self.path, self.records = run / "metrics.csv", list(previous)
        if self.records:
            self._write()
        elif self.path.exists():
            self.path.unlink()  # a new run does not keep an older run's rows

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._write()

    def _write(self) -> None:
        keys: dict[str, None] = {}
        for r in self.records:
            keys.update(dict.fromkeys(r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(keys), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.records)
        atomic_write_text(self.path, buf.getvalue())

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Event files in ``RUN/tensorboard/`` (``tensorboard --logdir RUN`` shows them)."""

    def __init__(self, run: Path, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise GptlabError("--logger tensorboard needs the tensorboard package: pip install tensorboard") from None
        purge = resume_step + 1 if resume_step is not None else None  # steps a killed run logged after its checkpoint
        self.writer = SummaryWriter(log_dir=str(run / "tensorboard"), purge_step=purge)

    def log(self, record: dict[str, Any]) -> None:
        for tag, value in _scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=int(record["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_key_configured() -> bool:
    """True when Weights & Biases has an API key here (``WANDB_API_KEY`` or ``wandb login``'s netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger:
    """A Weights & Biases run in ``RUN/wandb/``: offline without an API key."""

    def __init__(self, run: Path, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise GptlabError("--logger wandb needs the wandb package, which gptlab does not install: "
                              "pip install wandb (or use --logger tensorboard/csv)") from None
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_key_configured() else "offline")
        id_file = run / "wandb-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gptlab"), name=run.name, id=run_id,
                              resume="allow", dir=str(run), mode=mode, config=config)
        if mode == "offline":
            log.info("wandb: no API key configured, logging offline in %s (upload later with: wandb sync %s)",
                     run / "wandb", run / "wandb" / "offline-run-*")

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


# logger -> (the package it needs, how to get it)
_NEEDS = {"tensorboard": ("tensorboard", "pip install tensorboard"),
          "wandb": ("wandb", "pip install wandb (gptlab does not install it)")}


def check_logger_names(names: Iterable[str]) -> list[str]:
    """The names, each once, in order. An unknown one, or one whose package is not installed, is a
    GptlabError (checked before a run is created, so a missing package costs no run directory)."""
    out: list[str] = []
    for n in names:
        if n not in LOGGERS:
            raise GptlabError(f"logger={n!r} is not a logger; choose from {', '.join(LOGGERS)} (several allowed)")
        if n in _NEEDS and importlib.util.find_spec(_NEEDS[n][0]) is None:
            raise GptlabError(f"--logger {n} needs the {_NEEDS[n][0]} package: {_NEEDS[n][1]}; "
                              "or drop it (--logger csv needs nothing)")
        if n not in out:
            out.append(n)
    return out


def open_loggers(names: Iterable[str], run: Path, previous: list[dict], resume_step: int | None,
                 config: dict[str, Any], is_main: bool = True) -> list[MetricsLogger]:
    """The loggers ``names`` for run directory ``run`` (none off the main rank).

    ``previous``: the records a resumed run keeps (what ``metrics.jsonl`` holds), ``resume_step`` its
    checkpoint's step, ``config``: the settings a W&B run records.
    """
    names = check_logger_names(names)
    if not is_main:
        return []
    opened: list[MetricsLogger] = []
    try:
        for n in names:
            if n == "csv":
                opened.append(CsvLogger(run, previous))
            elif n == "tensorboard":
                opened.append(TensorBoardLogger(run, resume_step))
            else:
                opened.append(WandbLogger(run, config))
    except BaseException:
        close_loggers(opened)
        raise
    return opened


def close_loggers(loggers: list[MetricsLogger]) -> None:
    """Close every logger (one that fails to close does not keep the others open)."""
    for lg in loggers:
        try:
            lg.close()
        except Exception as e:  # a logger's flush must not turn a finished run into a failure
            log.warning("closing the %s logger failed: %s", type(lg).__name__, e)


__all__ = ["CsvLogger", "LOGGERS", "LoggerName", "MetricsLogger", "TensorBoardLogger", "WandbLogger",
           "check_logger_names", "close_loggers", "open_loggers", "scalar_tag", "wandb_key_configured"]
