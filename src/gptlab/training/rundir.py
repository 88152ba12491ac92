"""One run directory: refuse to clobber, create (replacing by rename), lock, record settings, resume.

    RunDir.new(out, ...)        checks that ``out`` may take a new run; writes nothing
    run.create(record)          writes the run's settings, and only then replaces an old run (--overwrite):
                                the new run is built in a hidden sibling and renamed into place
    RunDir.resume(path, ...)    the run to continue and its recorded settings (locked)
    run.latest_checkpoint()     the newest complete checkpoint

While a process writes a run it holds an OS lock (``fcntl.flock``) on ``RUN/.lock``; the kernel releases
it when the process ends, however it ends (``kill -9`` included), so a stale lock never blocks a run. A
second writer refuses in one line naming the first one's pid.

The settings file is one record, ``{"settings": ..., "train": ..., "steps_per_epoch": ...}`` plus what a
recipe adds, written as JSON (``*.json``) or YAML (``train_config.yaml``, pretraining's historical name).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_text
from gptlab.refs import RUN_CONFIGS
from gptlab.training.report import read_records

LOCK = ".lock"


def holds_run(path: Path) -> bool:
    """Whether ``path`` already holds a trained run (a model or checkpoints)."""
    return (path / "checkpoints").exists() or (path / "model").exists()


def lock_run(path: Path) -> int:
    """Take the writer's lock of run directory ``path`` (which exists); returns the open descriptor.

    Raises a one-line GptlabError naming the pid that holds it.
    """
    import fcntl

    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise GptlabError(f"{path} is being written by another gptlab process (pid {pid}); wait for it to "
                          "finish, or give another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _dump(path: Path, record: dict) -> str:
    if path.suffix in (".yaml", ".yml"):
        return yaml.safe_dump(record, sort_keys=False)
    return json.dumps(record, indent=2) + "\n"


class RunDir:
    """A run directory that this process writes (see the module docstring)."""

    def __init__(self, path: str | Path, config_name: str, *, replace: bool = False):
        self.path, self.config_name, self.replace = Path(path), config_name, replace
        self._fds: list[int] = []
        self._replaced: Path | None = None  # the old run an --overwrite moved aside, until the new one checkpoints

    # ---- a new run ------------------------------------------------------------------------------

    @classmethod
    def new(cls, out: str | Path, config_name: str, overwrite: bool) -> "RunDir":
        """A new run at ``out``: refused if ``out`` holds a run and not ``overwrite``. Nothing is written yet."""
        run = Path(out)
        if holds_run(run) and not overwrite:
            raise GptlabError(f"{run} already holds a run; pass --resume {run} to continue it, --out NEW_DIR "
                              "for a new one, or --overwrite to replace it")
        return cls(run, config_name, replace=holds_run(run))

    def create(self, record: dict, files: dict[str, Any] | None = None) -> Path:
        """Write the settings ``record`` (and ``files``: name -> ``write(path)``), locked; returns the path.

        With --overwrite the new run is built in a hidden sibling and renamed into place; the old run is
        kept aside (``.NAME.old-PID``) until the new one has written its first checkpoint
        (:meth:`drop_replaced`). A run that stops before that (Ctrl-C, an error) gets the old run back,
        so at every moment one whole run is there.
        """
        files = files or {}
        if not self.replace:
            self.path.mkdir(parents=True, exist_ok=True)
            self._fds.append(lock_run(self.path))
            self._write(self.path, record, files)
            return self.path
        self._fds.append(lock_run(self.path))  # no other process is writing the old run
        stage = self.path.parent / f".{self.path.name}.new-{os.getpid()}"
        _clean_stale(self.path)
        stage.mkdir()
        self._fds.append(lock_run(stage))  # the lock file moves with the directory
        self._write(stage, record, files)
        old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
        os.rename(self.path, old)
        os.rename(stage, self.path)
        self._replaced = old
        return self.path

    def drop_replaced(self) -> None:
        """The new run has a checkpoint: delete the old run it replaced (a no-op otherwise)."""
        if self._replaced is not None:
            shutil.rmtree(self._replaced, ignore_errors=True)
            self._replaced = None

    def _restore_replaced(self) -> None:
        """The new run stopped before its first checkpoint: put the old run back in its place."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        os.rename(self._replaced, self.path)
        self._replaced = None

    def _write(self, where: Path, record: dict, files: dict[str, Any]) -> None:
        for name, write in files.items():
            write(where / name)
        atomic_write_text(where / self.config_name, _dump(where / self.config_name, record))

    # ---- a run to continue ----------------------------------------------------------------------

    @classmethod
    def resume(cls, resume: str | Path, config_name: str, what: str, *, overwrite: bool = False,
               lock: bool = True) -> tuple["RunDir", dict]:
        """(the run to continue, locked; its recorded settings record). Every way the path can be wrong
        is one GptlabError saying what to do. ``lock=False``: read only (the other ranks of a multi-process
        run, while rank 0 holds the lock)."""
        run = Path(resume)
        if overwrite:
            raise GptlabError(f"--resume {run} continues that run and --overwrite would delete it; drop one of the two")
        if run.is_file():
            raise GptlabError(f"--resume {run} is a file, not a run directory; give the --out directory of an "
                              f"earlier {what} run")
        if not run.is_dir():
            raise GptlabError(f"--resume {run}: no such directory; give the --out directory of an earlier {what} run")
        saved = run / config_name
        if not saved.is_file():
            other = next((cmd for name, cmd in RUN_CONFIGS.items() if (run / name).is_file()), None)
            hint = f"it was made by `{other}`; resume it with that command" if other else "check the --resume path"
            article = "an" if what[:1] in "aeiou" else "a"
            raise GptlabError(f"{run} is not {article} {what} run (no {config_name}); {hint}")
        try:
            text = saved.read_text()
            meta = yaml.safe_load(text) if saved.suffix == ".yaml" else json.loads(text)
            if not isinstance(meta, dict) or not isinstance(meta.get("train"), dict):
                raise KeyError("train")
        except (json.JSONDecodeError, yaml.YAMLError, KeyError, AttributeError, TypeError) as e:
            raise GptlabError(f"{saved} is damaged or from another gptlab version ({type(e).__name__}: {e}); "
                              "the run cannot be resumed, start a new one with --out") from None
        rd = cls(run, config_name)
        if lock:
            rd._fds.append(lock_run(run))
            rd.clean_stale_temp_files()
        return rd, meta

    def record_limits(self, meta: dict, cfg, limits) -> None:
        """Record the stopping limits this resumed run goes to in its settings (``meta``, as read; the file
        rewritten atomically, only when they changed): a later --resume without the flags (after a crash,
        say) continues to them, and the file says what the run was trained to."""
        train = meta["train"]
        given = {name: getattr(cfg, name) for name in limits if hasattr(cfg, name)}
        if all(train.get(name) == value for name, value in given.items()):
            return
        train.update(given)
        atomic_write_text(self.path / self.config_name, _dump(self.path / self.config_name, meta))

    def clean_stale_temp_files(self) -> list[Path]:
        """Delete the temp files a killed writer left (``.NAME.XXXX.tmp`` beside each file it was replacing
        atomically). Safe only under the lock: no other process writes the run."""
        stale = [p for p in self.path.rglob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def latest_checkpoint(self) -> Path:
        """The newest complete checkpoint (see :func:`gptlab.training.checkpoint.latest_checkpoint`)."""
        from gptlab.training.checkpoint import latest_checkpoint

        return latest_checkpoint(self.path)

    def checkpoint_step(self) -> int | None:
        """The step of the latest checkpoint, read from its name (``step-000020``) without loading it."""
        m = re.fullmatch(r"step-(\d+)", self.latest_checkpoint().name)
        return int(m.group(1)) if m else None

    def refuse_reached_limit(self, cfg, steps_per_epoch: int | None, flags: str) -> None:
        """Refuse to resume a run already at the (new) stopping limit of ``cfg``: it would train nothing.

        ``steps_per_epoch`` turns an ``epochs`` limit into steps; when it is not known yet, an ``epochs``
        limit is not checked. ``flags`` names the command's limit flags.
        """
        step = self.checkpoint_step()
        target = cfg.total_steps(steps_per_epoch)
        if step is not None and target is not None and step >= target:
            epoch = f" (epoch {round(step / steps_per_epoch, 2):g})" if steps_per_epoch else ""
            raise GptlabError(f"{self.path} is already at step {step}{epoch}; give a larger {flags} to continue")
        reached = self.reached_val_loss(cfg.target_loss, step)
        if reached is not None:
            raise GptlabError(f"{self.path} already reached its target loss {cfg.target_loss:g} (val loss "
                              f"{reached[1]:.4f} at step {reached[0]}); give a lower --target-loss to train on")

    def reached_val_loss(self, target: float | None, step: int | None) -> tuple[int, float] | None:
        """(step, val loss) of the first evaluation up to checkpoint ``step`` at or below ``target``, or None."""
        if target is None or step is None:
            return None
        return next(((r["step"], r["val_loss"]) for r in read_records(self.path / "metrics.jsonl", step)
                     if r.get("val_loss") is not None and r["val_loss"] <= target), None)

    # ---- the lock -------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the lock(s) this process holds."""
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._replaced is not None:
            if exc_type is not None:
                self._restore_replaced()
            else:
                self.drop_replaced()
        self.close()


def _clean_stale(run: Path) -> None:
    """Delete hidden siblings ``.RUN.new-PID`` / ``.RUN.old-PID`` that a killed process left behind."""
    for p in run.parent.glob(f".{run.name}.[no][el][wd]-*"):
        try:
            fd = lock_run(p)
        except (GptlabError, OSError):
            continue  # another live process is using it
        os.close(fd)
        shutil.rmtree(p, ignore_errors=True)
