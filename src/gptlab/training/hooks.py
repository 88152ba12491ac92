"""The training loop's side effects, each a small named piece: progress, evaluation, metrics (and the
experiment loggers, :mod:`gptlab.training.loggers`), samples, the loss plot, the best model, checkpoints
and early stopping.

Every piece takes ``is_main``: in a multi-process run only the main rank prints and writes files (the
others still evaluate, so a later all-reduce has every rank's numbers). With ``is_main=False`` a piece
keeps its in-memory state (records, best loss, patience) but touches no file and prints nothing. What
needs every rank (an FSDP forward pass for a sample, gathering the weights to save the model, writing a
sharded checkpoint) is called on every rank, and only rank 0 writes the result.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from gptlab.fileio import atomic_write_text
from gptlab.training.batches import Batch, IndexedBatches
from gptlab.training.checkpoint import save_checkpoint, save_sharded_checkpoint
from gptlab.training.distributed import broadcast_object
from gptlab.training.loggers import close_loggers, open_loggers
from gptlab.training.report import MetricsLog, plot_losses


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Every tensor of ``batch`` on ``device``."""
    return tuple(t.to(device, non_blocking=True) for t in batch)


@dataclass
class Counters:
    """Where a run is: what a checkpoint records and a resume restores exactly."""

    step: int = 0
    tokens: int = 0
    best_val: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    elapsed: float = 0.0

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Counters":
        """The counters saved in a checkpoint's ``state.pt``."""
        return cls(state["step"], state["tokens"], state.get("best_val"), state.get("best_step"),
                   state.get("bad_evals", 0), state.get("elapsed", 0.0))


class Throughput:
    """Tokens and seconds since the last evaluation (the tok/s figure)."""

    def __init__(self):
        self.tokens, self.seconds = 0, 0.0

    def add(self, tokens: int, seconds: float = 0.0) -> None:
        self.tokens += tokens
        self.seconds += seconds

    def rate(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def reset(self) -> None:
        self.tokens, self.seconds = 0, 0.0


class Progress:
    """A progress bar on a terminal, a plain line every ``log_every`` steps elsewhere (logs, CI), or nothing."""

    def __init__(self, enabled: bool, max_steps: int | None, c: Counters, log_every: int,
                 echo: Callable[[str], None], is_main: bool = True):
        self.echo, self.max_steps, self.log_every = echo, max_steps, log_every
        self.start_step, self.start_elapsed = c.step, c.elapsed
        enabled = enabled and is_main
        self.plain = enabled and not sys.stderr.isatty()
        self.bar = None
        if enabled and not self.plain:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_steps, initial=c.step, unit="step", dynamic_ncols=True, leave=True)

    def write(self, line: str) -> None:
        """A status line that does not break the bar."""
        (self.bar.write if self.bar is not None else self.echo)(line)

    def update(self, c: Counters, loss: float | torch.Tensor, speed: Throughput) -> None:
        """After each optimizer step; ``loss`` (maybe a device tensor) is read back every ``log_every`` steps only."""
        if self.bar is not None:
            self.bar.update(1)
            if c.step % self.log_every == 0:
                self.bar.set_postfix(loss=f"{float(loss):.3f}", tok_s=f"{speed.rate():,.0f}", refresh=False)
        elif self.plain and c.step % self.log_every == 0:
            rate = (c.step - self.start_step) / max(c.elapsed - self.start_elapsed, 1e-9)
            eta = f", eta {(self.max_steps - c.step) / rate:.0f}s" if self.max_steps and rate > 0 else ""
            self.echo(f"step {c.step}{f'/{self.max_steps}' if self.max_steps else ''}: loss {float(loss):.3f}, "
                      f"{speed.rate():,.0f} tok/s{eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None  # later lines (a final evaluation) are printed plainly


class Samples:
    """``samples.txt``: the text ``sample_fn`` writes at each evaluation, one section per step."""

    def __init__(self, run: Path, sample_fn: Callable[[nn.Module], str] | None, resumed_at: int | None,
                 is_main: bool = True):
        self.path, self.fn, self.is_main = run / "samples.txt", sample_fn, is_main
        if not is_main or not self.path.exists():
            return
        if resumed_at is None:
            self.path.unlink()
        else:  # sections written after the resumed checkpoint (by a run killed later) would repeat: drop them
            atomic_write_text(self.path, "".join(s for s in _sections(self.path.read_text())
                                                 if _section_step(s) <= resumed_at))

    def __call__(self, model: nn.Module, step: int, write: Callable[[str], None]) -> None:
        if self.fn is None or not self.is_main:
            return
        text = self.fn(model)
        write(f"  sample: {text!r}")
        prev = self.path.read_text() if self.path.exists() else ""
        atomic_write_text(self.path, prev + f"--- step {step} ---\n{text}\n")


_SECTION = re.compile(r"^--- step (\d+) ---$", re.M)


def _sections(text: str) -> list[str]:
    """``samples.txt`` split into its ``--- step N ---`` sections (text before the first one kept as is)."""
    starts = [m.start() for m in _SECTION.finditer(text)]
    if not starts:
        return [text] if text else []
    return ([text[:starts[0]]] if starts[0] else []) + [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


def _section_step(section: str) -> int:
    m = _SECTION.match(section)
    return int(m.group(1)) if m else 0


def keep_best(c: Counters, val_loss: float | None) -> bool:
    """Update the best validation loss and the patience count; True when this evaluation is the new best."""
    if val_loss is None:
        return False
    if c.best_val is None or val_loss < c.best_val:
        c.best_val, c.best_step, c.bad_evals = val_loss, c.step, 0
        return True
    c.bad_evals += 1
    return False


def eval_line(step: int, tr: dict[str, float], va: dict[str, float], tok_s: float) -> str:
    """``step 50: train loss 4.210, val loss 4.380, val accuracy 0.812, 1,234 tok/s``."""
    line = f"step {step}: train loss {tr['loss']:.3f}"
    if va:
        line += f", val loss {va['loss']:.3f}"
        line += "".join(f", val {k} {v:.3f}" for k, v in va.items() if k not in ("loss", "perplexity"))
    return line + f", {tok_s:,.0f} tok/s"


# loss.png is drawn at most this often (seconds, counted from the start of the run), and always for its
# last evaluation: a matplotlib figure takes ~0.7 s on a 2-core CPU (the first ~1 s more, importing it),
# as long as 14-40 steps of a small model; a run shorter than this draws it once, at the end.
PLOT_EVERY_S = 60.0


class Evaluation:
    """What happens every ``eval_every`` steps, in order: evaluate train/val, log the metrics, print a line,
    sample, plot (at most every ``PLOT_EVERY_S`` seconds, and at the end), keep the best model, write a
    checkpoint; :meth:`__call__` says whether to stop: ``"early_stopping"`` (patience ran out),
    ``"target_loss"`` (the val loss reached ``cfg.target_loss``) or None."""

    def __init__(self, run: Path, model: nn.Module, task, train: IndexedBatches, val: IndexedBatches | None,
                 cfg, optimizer, tokenizer, *, save_model: Callable[[nn.Module, Path], None],
                 samples: Samples, progress: Progress, autocast, resumed_at: int | None, is_main: bool = True,
                 on_checkpoint: Callable[[], None] | None = None, loggers: Sequence[str] = (),
                 aux: nn.Module | None = None, parallel=None):
        self.aux = aux  # the task's own trainable modules: saved in state.pt, not in the model directory
        self.run, self.model, self.task, self.cfg, self.optimizer = run, model, task, cfg, optimizer
        self.tokenizer, self.save_model, self.samples, self.progress = tokenizer, save_model, samples, progress
        self.autocast, self.is_main, self.train, self.has_val = autocast, is_main, train, val is not None
        self.device, self.on_checkpoint = next(model.parameters()).device, on_checkpoint
        self.parallel = parallel  # None: one process
        self.eval_train = train.fixed_batches(cfg.eval_iters)
        self.eval_val = val.fixed_batches(cfg.eval_iters) if val is not None else None
        self.log = MetricsLog(run / "metrics.jsonl", resume_step=resumed_at, write=is_main)
        self.loggers = open_loggers(loggers, run, self.log.records, resumed_at, dataclasses.asdict(cfg), is_main)
        self.tokens_per_epoch = len(train) * train.bs * max(1, train.tokens_per_item)
        self.plotted_at = time.monotonic()  # of the last loss.png (the start: the first waits PLOT_EVERY_S)
        self.plotted_step = -1

    def evaluate(self) -> tuple[dict[str, float], dict[str, float]]:
        """(train metrics, val metrics) over the fixed evaluation batches."""
        self.model.eval()
        with torch.no_grad(), self.autocast():
            tr = self.task.evaluate(self.model, [to_device(b, self.device) for b in self.eval_train])
            va = (self.task.evaluate(self.model, [to_device(b, self.device) for b in self.eval_val])
                  if self.eval_val else {})
        return tr, va

    def record(self, c: Counters, lr: float, tr: dict, va: dict, speed: Throughput) -> dict:
        """One ``metrics.jsonl`` line."""
        rec = {"step": c.step, "tokens": c.tokens, "epoch": round(self.train.epoch_of(c.step * self.cfg.grad_accum), 4),
               "lr": lr, "train_loss": tr["loss"], "val_loss": va.get("loss"),
               "tokens_per_s": speed.rate(), "elapsed_s": round(c.elapsed, 2)}
        rec.update({f"train_{k}": v for k, v in tr.items() if k != "loss"})
        rec.update({f"val_{k}": v for k, v in va.items() if k != "loss"})
        return rec

    def checkpoint(self, c: Counters, rng: dict | None = None) -> None:
        """checkpoints/step-N with the counters (``rng``: the state to replay an interrupted step from);
        sharded, written by every rank, in a multi-process run."""
        state = {**dataclasses.asdict(c), "config": dataclasses.asdict(self.cfg)}
        if hasattr(self.train, "state_dict"):  # a mixture's or a stream's data position (see gptlab.data.mixture)
            state["data"] = self.train.state_dict(c.step * self.cfg.grad_accum)
        if self.aux is not None:
            state["aux"] = self.aux.state_dict()
        if self.parallel is not None and self.parallel.dist.active:
            save_sharded_checkpoint(self.run, self.parallel, self.tokenizer, self.optimizer, state)
        elif self.is_main:
            save_checkpoint(self.run, self.model, self.tokenizer, self.optimizer, state, rng=rng)
        if self.is_main and self.on_checkpoint is not None:
            self.on_checkpoint()

    def export_model(self) -> None:
        """Write RUN/model, the ordinary single-file model directory (every rank calls it; rank 0 writes)."""
        if self.parallel is None:
            if self.is_main:
                self.save_model(self.model, self.run / "model")
            return
        self.parallel.export(self.save_model, self.run / "model")

    def model_saved(self) -> bool:
        """Whether RUN/model exists (rank 0 looks; every rank gets the same answer)."""
        saved = self.is_main and (self.run / "model" / "config.json").exists()
        return bool(broadcast_object(saved, self.parallel.dist) if self.parallel is not None else saved)

    def __call__(self, c: Counters, lr: float, speed: Throughput) -> str | None:
        tr, va = self.evaluate()
        rec = self.record(c, lr, tr, va, speed)
        speed.reset()
        self.log.log(rec)
        for logger in self.loggers:  # csv / tensorboard / wandb (main rank only)
            logger.log(rec)
        if self.is_main:
            self.progress.write(eval_line(c.step, tr, va, rec["tokens_per_s"]))
        sharded = self.parallel is not None and self.parallel.sharded and self.samples.fn is not None
        # FSDP: rank 0 samples from the whole model, gathered into its unsharded CPU copy (a collective)
        self.samples(self.parallel.gathered() if sharded else self.model, c.step, self.progress.write)
        if time.monotonic() - self.plotted_at >= PLOT_EVERY_S:
            self.plot()
        improved = keep_best(c, va.get("loss") if va else None)
        if improved or not self.has_val:
            self.export_model()
        self.checkpoint(c)
        why = None
        if self.cfg.patience is not None and c.bad_evals >= self.cfg.patience:
            why = "early_stopping"
            line = f"early stopping: no val improvement in {self.cfg.patience} evaluations (best step {c.best_step})"
        elif self.cfg.target_loss is not None and va and va["loss"] <= self.cfg.target_loss:
            why = "target_loss"
            line = f"reached the target: val loss {va['loss']:.4f} <= {self.cfg.target_loss:g} at step {c.step}"
        if why and self.is_main:
            self.progress.write(line)
        return why

    def finish(self, c: Counters, lr: float, speed: Throughput, stopped: str) -> None:
        """After the loop. A time limit (or a resumed run already past --max-steps) may stop between
        evaluations: evaluate the final state too, so metrics.jsonl, loss.png, samples.txt and the
        checkpoint describe it; and write RUN/model if no evaluation did."""
        if stopped in ("max_time", "max_steps", "epochs") and self.last_step() != c.step and c.step > 0:
            self(c, lr, speed)
        if self.plotted_step != self.last_step():
            self.plot()
        if c.step > 0 and not self.model_saved():
            self.export_model()

    def plot(self) -> None:
        """Draw loss.png from every evaluation so far (main rank)."""
        if self.is_main and self.log.records:
            plot_losses(self.log.records, self.run / "loss.png", self.tokens_per_epoch)
        self.plotted_at, self.plotted_step = time.monotonic(), self.last_step()

    def close(self) -> None:
        """Flush and close the experiment loggers."""
        close_loggers(self.loggers)
        self.loggers = []

    def last_step(self) -> int:
        """The step of the latest logged evaluation (-1 before the first)."""
        return self.log.records[-1]["step"] if self.log.records else -1
