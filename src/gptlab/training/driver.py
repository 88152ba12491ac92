"""The one run driver: every recipe (pretraining, classification, instruction tuning, distillation) is a
Settings class plus a :class:`Recipe`, and runs through :func:`run_recipe`:

    check the limits -> open the run (resume: read + lock its settings, refuse changes and a reached
    limit; new: refuse an existing run) -> validate -> build data, model, task (nothing written yet)
    -> record the settings (replacing an old run by rename) -> train_loop -> the recipe's report
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch.nn as nn

from gptlab.logs import get_logger
from gptlab.training.batches import IndexedBatches
from gptlab.training.loggers import check_logger_names
from gptlab.training.loop import TrainConfig, TrainResult, train_loop
from gptlab.training.rundir import RunDir
from gptlab.training.settings import flag_name, refuse_changed, resumed_train_config


log = get_logger(__name__)


@dataclass
class Job:
    """What a recipe builds for the loop (see :func:`gptlab.training.loop.train_loop` for the fields)."""

    model: nn.Module
    train: IndexedBatches
    val: IndexedBatches | None
    task: Any
    tokenizer: Any
    steps_per_epoch: int | None = None
    save_model: Callable[[nn.Module, Path], None] | None = None
    sample_fn: Callable[[nn.Module], str] | None = None
    resume_state: dict | None = None  # resuming: the checkpoint's state (its weights already in ``model``)
    record: dict = field(default_factory=dict)  # recorded beside the settings
    files: dict[str, Callable[[Path], None]] = field(default_factory=dict)  # written into a new run
    extra: dict = field(default_factory=dict)  # what the recipe's report needs
    aux: nn.Module | None = None  # the task's own trainable modules (saved in checkpoints, not in RUN/model)


class Recipe(Protocol):
    """What a recipe provides besides its Settings class."""

    config_file: str  # the settings file of its runs, e.g. "classify_config.json"
    what: str  # "classification": names the run in errors
    limits: tuple[str, ...]  # the settings a resumed run may change, e.g. ("max_steps", "epochs")
    refs: dict[str, tuple[str, ...]]  # reference settings -> names recorded as typed (see recorded_ref)

    def check(self, s) -> None:
        """A new run: refuse bad settings before anything is read."""

    def train_config(self, s, device) -> TrainConfig:
        """A new run's TrainConfig."""

    def record(self, s) -> dict:
        """A new run's settings as recorded for --resume."""

    def from_record(self, meta: dict, s):
        """A resumed run's settings: the recorded ones, with this process's ``s`` (device, progress).
        May bring an older record up to date in ``meta`` (it is what the resume rule compares with)."""

    def build(self, s, cfg: TrainConfig, device, resuming: RunDir | None,
              steps_known: Callable[[int], None]) -> Job:
        """Data, model, task (resuming: the checkpoint loaded, ``Job.resume_state`` set); calls
        ``steps_known(steps_per_epoch)`` as soon as that is known."""

    def report(self, s, cfg: TrainConfig, job: Job, result: TrainResult, run: Path) -> Any:
        """The run's return value (and what it prints at the end)."""


def limit_flags(limits) -> str:
    """``("max_steps", "epochs")`` -> ``--max-steps/--epochs``."""
    return "/".join(flag_name(n) for n in limits)


def run_recipe(recipe: Recipe, s, *, is_main: bool = True) -> Any:
    """Run one recipe end to end (see the module docstring); returns what ``recipe.report`` returns."""
    from gptlab.device import pick_device

    TrainConfig(**{n: getattr(s, n, None) for n in ("max_steps", "epochs", "max_time", "patience")}
                ).validate_limits()  # a bad limit is refused before anything is read
    check_logger_names(s.logger)  # and a logger that is unknown or not installed
    device = pick_device(s.device)
    flags = limit_flags(recipe.limits[:2])
    if s.resume:
        run, meta = RunDir.resume(s.resume, recipe.config_file, recipe.what, overwrite=s.overwrite)
        with run:
            resumed = recipe.from_record(meta, s)  # (an old run's record is brought up to date in meta)
            refuse_changed(s, meta, run.path, recipe.limits, recipe.refs)
            cfg = resumed_train_config(meta["train"], s, recipe.limits)
            run.refuse_reached_limit(cfg, meta.get("steps_per_epoch"), flags)  # before anything is loaded
            _note_ignored_out(s)
            s = resumed
            late = "steps_per_epoch" not in meta  # recorded before it was: an epochs limit is checked when known
            job = recipe.build(s, cfg, device, run,
                               lambda n: run.refuse_reached_limit(cfg, n, flags) if late else None)
            return _train(recipe, s, cfg, job, run, is_main)
    s.check_positive()
    recipe.check(s)
    run = RunDir.new(s.out, recipe.config_file, s.overwrite)
    cfg = recipe.train_config(s, device)
    cfg.validate()
    job = recipe.build(s, cfg, device, None, lambda n: None)
    with run:
        run.create({"settings": recipe.record(s), "train": dataclasses.asdict(cfg),
                    "steps_per_epoch": job.steps_per_epoch, **job.record}, job.files)
        return _train(recipe, s, cfg, job, run, is_main)


def _note_ignored_out(s) -> None:
    """Say so when a resumed run is given an --out of its own: the run continues where it is."""
    default_out = next(f.default for f in dataclasses.fields(s) if f.name == "out")
    if s.out not in (None, default_out) and Path(s.out).absolute() != Path(s.resume).absolute():
        log.warning("--resume %s continues that run in place; --out %s is ignored (copy the run directory "
                    "first to continue it elsewhere)", s.resume, s.out)


def _train(recipe: Recipe, s, cfg: TrainConfig, job: Job, run: RunDir, is_main: bool) -> Any:
    result = train_loop(job.model, job.train, job.val, cfg, run.path, task=job.task, tokenizer=job.tokenizer,
                        resume_state=job.resume_state, sample_fn=job.sample_fn, save_model=job.save_model,
                        progress=s.progress, is_main=is_main, on_checkpoint=run.drop_replaced, loggers=s.logger,
                        aux=job.aux)
    return recipe.report(s, cfg, job, result, run.path)
