"""The one run driver: every recipe (pretraining, classification, instruction tuning, distillation) is a
Settings class plus a :class:`Recipe`, and runs through :func:`run_recipe`:

    check the limits -> open the run (resume: read + lock its settings, refuse changes and a reached
    limit; new: refuse an existing run) -> validate -> build data, model, task (nothing written yet)
    -> record the settings (replacing an old run by rename) -> train_loop -> the recipe's report

Several processes (``torchrun ... -m gptlab COMMAND`` or ``--nproc N``, which starts torchrun): every rank
runs the same steps; rank 0 alone opens, locks and writes the run and prints. Each rank builds the data for
the global batch (``batch_size x world``) and reads its part of it; the model is parallelized
(:func:`gptlab.training.parallel.parallelize`) just before the loop. An error on any rank is one line naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.logs import get_logger
import gptlab.training.distributed as D
from gptlab.training.batches import IndexedBatches
from gptlab.training.loggers import check_logger_names
from gptlab.training.loop import TrainConfig, TrainResult, train_loop
from gptlab.training.rundir import RunDir
from gptlab.training.settings import flag_name, given_names, refuse_changed, resumed_train_config


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
    """Run one recipe end to end (see the module docstring); returns what ``recipe.report`` returns
    (a run this call launches in several processes: the launcher's exit status, 0; a rank other than 0
    of a multi-process run: None, the report being rank 0's)."""
    TrainConfig(**{n: getattr(s, n, None) for n in ("max_steps", "epochs", "max_time", "patience", "target_loss")}
                ).validate_limits()  # a bad limit is refused before anything is read
    check_logger_names(s.logger)  # and a logger that is unknown or not installed
    if _launches(s):
        from gptlab.refs import RUN_CONFIGS

        words = RUN_CONFIGS[recipe.config_file].split()[1:]  # "gptlab finetune classify" -> finetune classify
        values, named = dataclasses.asdict(s), given_names(s)  # the workers see what was given, as given
        values = {k: v for k, v in values.items() if named is None or k in named}
        return D.launch(words, D.settings_for_workers(values), nproc=s.nproc, nnodes=s.nnodes,
                        rdzv_endpoint=s.rdzv_endpoint)
    d = D.setup(s.device)
    try:
        with contextlib.ExitStack() as quiet:
            if not d.is_main:  # the other ranks print nothing; their errors still reach stderr
                quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
                logging.getLogger("gptlab").setLevel(logging.ERROR)
            result = _run(recipe, s, d, is_main and d.is_main)
        D.wait_for_all(d)  # leave the group together: a rank tearing gloo down while another still works aborts
        return result
    except Exception as e:
        if not d.active:
            raise
        err = D.rank_error(e, d)
        if isinstance(err, D.LostPeer) and os.environ.get(D.LAUNCHED):
            raise SystemExit(D.LOST_PEER_EXIT) from None  # the launcher names the rank that failed
        if D.tell_launcher(err):  # the launcher prints it once, however many ranks failed alike
            raise SystemExit(1) from None
        raise err from None
    finally:
        D.teardown(d)


def _launches(s) -> bool:
    """This process starts torchrun (instead of training): several processes asked for, none running yet."""
    from gptlab.training.parallel import STRATEGIES

    if s.nproc < 1:
        raise GptlabError(f"--nproc {s.nproc} must be >= 1 (processes per node)")
    if s.strategy not in STRATEGIES:
        raise GptlabError(f"--strategy {s.strategy!r} is not one of {', '.join(STRATEGIES)}")
    return not D.under_torchrun() and (s.nproc > 1 or str(s.nnodes) != "1" or s.strategy in ("ddp", "fsdp"))


def _open_resumed(recipe: Recipe, s, d: D.Dist) -> tuple[RunDir, dict]:
    """Rank 0 opens (locks) the run first; the others then read its record."""
    if d.is_main:
        opened = RunDir.resume(s.resume, recipe.config_file, recipe.what, overwrite=s.overwrite)
    D.barrier(d)
    if not d.is_main:
        opened = RunDir.resume(s.resume, recipe.config_file, recipe.what, overwrite=s.overwrite, lock=False)
    return opened


def _build(recipe: Recipe, s, cfg: TrainConfig, d: D.Dist, resuming: RunDir | None, steps_known) -> Job:
    """``recipe.build`` with the global batch (``batch_size x world``); then this rank reads its part of
    every training batch. What the recipe sets in the config besides the batch (e.g. ``eval_every``) is
    kept in ``cfg``."""
    if d.world == 1:
        return recipe.build(s, cfg, d.device, resuming, steps_known)
    built = dataclasses.replace(cfg, batch_size=cfg.batch_size * d.world)
    job = recipe.build(s, built, d.device, resuming, steps_known)
    for f in dataclasses.fields(cfg):
        if f.name != "batch_size":
            setattr(cfg, f.name, getattr(built, f.name))
    job.train.shard(d.rank, d.world)
    mine = (len(job.train), job.train.n, job.steps_per_epoch)
    if D.broadcast_object(mine, d) != mine:  # every rank must read the same data (e.g. the same tokenizer)
        raise GptlabError(f"this rank built other training data than rank 0 ({mine[1]} items, "
                          f"{mine[0]} batches per epoch): give every process the same --data and --tokenizer")
    return job


def _run(recipe: Recipe, s, d: D.Dist, is_main: bool) -> Any:
    device = d.device
    flags = limit_flags(recipe.limits[:2])
    if s.resume:
        run, meta = _open_resumed(recipe, s, d)
        with run:
            resumed = recipe.from_record(meta, s)  # (an old run's record is brought up to date in meta)
            refuse_changed(s, meta, run.path, recipe.limits, recipe.refs)
            given = resumed_train_config(meta["train"], s, recipe.limits)
            cfg = given.for_world(d.world)
            run.refuse_reached_limit(cfg, meta.get("steps_per_epoch"), flags)  # before anything is loaded
            if is_main:
                _note_ignored_out(s)
            s = resumed
            late = "steps_per_epoch" not in meta  # recorded before it was: an epochs limit is checked when known
            job = _build(recipe, s, cfg, d, run, lambda n: run.refuse_reached_limit(cfg, n, flags) if late else None)
            cfg.validate(has_val=job.val is not None)  # (a --target-loss needs validation data)
            if d.is_main:  # the new limits, once they can run (rank 0 holds the lock)
                run.record_limits(meta, given, recipe.limits)
            return _train(recipe, s, cfg, job, run, d, is_main)
    s.check_positive()
    recipe.check(s)
    run = RunDir.new(s.out, recipe.config_file, s.overwrite) if d.is_main else RunDir(s.out, recipe.config_file)
    cfg = dataclasses.replace(recipe.train_config(s, device), world_size=d.world)
    cfg.validate()
    job = _build(recipe, s, cfg, d, None, lambda n: None)
    cfg.validate(has_val=job.val is not None)
    with run:
        if d.is_main:
            run.create({"settings": recipe.record(s), "train": dataclasses.asdict(cfg),
                        "steps_per_epoch": job.steps_per_epoch, **job.record}, job.files)
        D.barrier(d)  # the run directory exists before any rank writes into it
        return _train(recipe, s, cfg, job, run, d, is_main)


def _note_ignored_out(s) -> None:
    """Say so when a resumed run is given an --out of its own: the run continues where it is."""
    default_out = next(f.default for f in dataclasses.fields(s) if f.name == "out")
    if s.out not in (None, default_out) and Path(s.out).absolute() != Path(s.resume).absolute():
        log.warning("--resume %s continues that run in place; --out %s is ignored (copy the run directory "
                    "first to continue it elsewhere)", s.resume, s.out)


def _train(recipe: Recipe, s, cfg: TrainConfig, job: Job, run: RunDir, d: D.Dist, is_main: bool) -> Any:
    from gptlab.device import autocast_dtype
    from gptlab.training.parallel import describe, parallelize

    par = parallelize(job.model, d, s.strategy, param_dtype=autocast_dtype(d.device, cfg.precision),
                      activation_checkpointing=s.activation_checkpointing)
    if d.active and is_main:
        print(f"parallel: {describe(par)}, {cfg.batch_size} sequences per process x {d.world} = global batch "
              f"{cfg.batch_size * d.world}", flush=True)
    result = train_loop(job.model, job.train, job.val, cfg, run.path, task=job.task, tokenizer=job.tokenizer,
                        resume_state=job.resume_state, sample_fn=job.sample_fn, save_model=job.save_model,
                        progress=s.progress, is_main=is_main, on_checkpoint=run.drop_replaced, parallel=par,
                        loggers=s.logger, aux=job.aux)
    job.model = par.unsharded()  # FSDP: the whole trained model, on rank 0 (a collective)
    if not d.is_main:
        return None  # the report (its lines, its files, its test generations) is rank 0's
    return recipe.report(s, cfg, job, result, run.path)
