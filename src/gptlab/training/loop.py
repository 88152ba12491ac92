"""The one training loop.

Pretraining, classification, instruction tuning, LoRA and distillation differ
in three things only — the batches, the loss, and which parameters train — so
they all run through :func:`train_loop` with a different :class:`Task` and batch
source. The loop reads top to bottom:

    for each optimizer step:
        lr <- warmup/cosine schedule (:class:`Schedule`)
        for each micro-batch (gradient accumulation): loss = task.loss(model, batch); backward
            (several processes: each reads its part of the batch; gradients are reduced on the last one)
        clip gradients; optimizer step (:func:`optimizer_step`)
        every eval_every steps: evaluate train/val, log, sample, plot, keep the best model,
        checkpoint, early stop (:class:`gptlab.training.hooks.Evaluation`; files on the main rank only)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn as nn

from gptlab.device import autocast_dtype
from gptlab.errors import GptlabError
from gptlab.models.base import LanguageModel
from gptlab.training.batches import Batch, IndexedBatches
from gptlab.training.checkpoint import load_rank_rng, load_sharded_optimizer, rng_state, set_rng_state
from gptlab.training.distributed import agree, all_sum
from gptlab.training.hooks import Counters, Evaluation, Progress, Samples, Throughput, to_device
from gptlab.training.parallel import Parallel, load_full_optimizer, single
from gptlab.training.losses import lm_cross_entropy
from gptlab.training.optim import build_optimizer, lr_at
from gptlab.training.speed import compile_model, flush_denormals
from gptlab.training.report import Diagnosis, diagnose
from gptlab.weights.native import save_model_dir


@dataclass
class TrainConfig:
    """Settings of one training run (what ``train_config.yaml`` records)."""

    max_steps: int | None = None  # optimizer steps; None -> from epochs
    epochs: float | None = None
    max_time: float | None = None  # seconds of training wall time
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 6e-4
    min_lr: float | None = None  # cosine floor; None -> lr / 10
    warmup_steps: int | None = None  # None -> 5% of max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast)
    compile: bool = False
    chunked_loss: bool = True  # head + cross-entropy chunk by chunk, never the (B, T, V) logits (training/losses.py)
    vocab_multiple: int = 1  # pad the head to a multiple of this in the loss (64: 50,257 -> 50,304); masked
    eval_every: int = 50
    eval_iters: int = 10
    log_every: int = 10
    patience: int | None = None  # early stopping: evaluations without val improvement
    target_loss: float | None = None  # stop at the first evaluation whose val loss is at or below it
    seed: int = 123
    device: str = "auto"
    flush_denormals: bool = True  # CPU: denormal floats read and written as zero while training (speed.flush_denormals)
    world_size: int = 1  # processes the run started with: its global batch is batch_size x world_size

    def for_world(self, world: int) -> "TrainConfig":
        """These settings run by ``world`` processes: the same global batch, split evenly (a run resumed
        with another number of processes keeps its batch; ``batch_size`` becomes the per-process part)."""
        total = self.batch_size * self.world_size
        if total % world:
            raise GptlabError(f"the run's global batch of {total} sequences ({self.batch_size} x {self.world_size} "
                              f"processes) does not split evenly into {world} processes; use a process count "
                              f"that divides {total}")
        return dataclasses.replace(self, batch_size=total // world, world_size=world)

    def steps_per_epoch(self, batches_per_epoch: int) -> int:
        """Optimizer steps in one pass over ``batches_per_epoch`` micro-batches (the one place it is computed)."""
        return max(1, batches_per_epoch // self.grad_accum)

    def total_steps(self, steps_per_epoch: int | None) -> int | None:
        """The step the run stops at: ``max_steps``, else ``epochs`` in steps (None: a time limit only,
        or an epochs limit while ``steps_per_epoch`` is not known yet)."""
        if self.max_steps is not None:
            return self.max_steps
        if self.epochs is not None and steps_per_epoch:
            return max(1, math.ceil(self.epochs * steps_per_epoch))
        return None

    def validate_limits(self) -> None:
        """Check the stopping limits that are set (the only settings a resumed run may change)."""
        if self.max_steps is not None and self.max_steps < 1:
            raise GptlabError(f"max_steps={self.max_steps} must be >= 1")
        if self.epochs is not None and not self.epochs > 0:
            raise GptlabError(f"epochs={self.epochs:g} must be > 0 (e.g. 1, or 0.5 for half a pass)")
        if self.max_time is not None and not self.max_time > 0:
            raise GptlabError(f"max_time={self.max_time:g} must be > 0 seconds")
        if self.patience is not None and self.patience < 1:
            raise GptlabError(f"patience={self.patience} must be >= 1 evaluation (omit it to never stop early)")
        if self.target_loss is not None and not (self.target_loss > 0 and math.isfinite(self.target_loss)):
            raise GptlabError(f"target_loss={self.target_loss} must be a finite validation loss > 0 (e.g. 1.886): "
                              "a cross-entropy never goes below 0")

    def validate(self, has_val: bool = True) -> None:
        """Raise a GptlabError naming the first setting that cannot work (``has_val``: the run has
        validation data)."""
        if self.max_steps is None and self.epochs is None and self.max_time is None:
            raise GptlabError("say how long to train: give max_steps, epochs or max_time")
        self.validate_limits()
        if self.target_loss is not None and not has_val:
            raise GptlabError(f"target_loss={self.target_loss:g} stops at a validation loss, but this run has no "
                              "validation data: give it some (e.g. --val-ratio), or drop the target")
        for f in ("batch_size", "grad_accum", "eval_every", "eval_iters", "log_every", "vocab_multiple"):
            if getattr(self, f) < 1:
                raise GptlabError(f"{f}={getattr(self, f)} must be >= 1")
        if not self.lr > 0:
            raise GptlabError(f"lr={self.lr} must be > 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise GptlabError(f"{name}={getattr(self, name)} must be in [0, 1) (AdamW's moment decay, "
                                  "e.g. 0.9 and 0.95)")
        if not self.weight_decay >= 0:
            raise GptlabError(f"weight_decay={self.weight_decay} must be >= 0 (0 turns it off)")
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise GptlabError(f"grad_clip={self.grad_clip} must be >= 0 (0 or None turns clipping off)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise GptlabError(f"warmup_steps={self.warmup_steps} must be >= 0 (0 means no warmup)")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise GptlabError(f"min_lr={self.min_lr:g} must be between 0 and lr={self.lr:g} "
                              "(it is the floor the cosine decay ends at; default lr/10)")


class Task(Protocol):
    """What differs between kinds of training: the loss and the evaluation metrics."""

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar loss of one batch (gradients flow through it)."""
        ...

    def evaluate(self, model: nn.Module, batches: list[Batch]) -> dict[str, float]:
        """Metrics over fixed batches: at least ``"loss"``; others are logged as train_/val_ NAME."""
        ...


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The model's weighted auxiliary loss of its last call (a mixture of experts' load balancing), or None.

    ``model`` may be ``torch.compile``'s wrapper (the loop's ``fwd``); a module that is
    not a gptlab language model (a test's toy model) has none.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile keeps the module it wraps here
    model = getattr(model, "module", model)  # and DistributedDataParallel here
    return model.aux_loss() if isinstance(model, LanguageModel) else None


class LanguageModeling:
    """Next-token cross-entropy over all positions (targets of -100 are ignored), plus the model's
    auxiliary loss when it has one (a mixture of experts' load balancing, ``router_aux_loss_coef`` x it).

    ``chunked``: the head and the cross-entropy run chunk by chunk without the (B, T, V) logits, the head
    padded to ``vocab_multiple`` (:func:`gptlab.training.losses.lm_cross_entropy`); the loss is the same.
    """

    chunked, vocab_multiple = True, 1  # class defaults: a subclass need not call __init__

    def __init__(self, chunked: bool = True, vocab_multiple: int = 1):
        self.chunked, self.vocab_multiple = chunked, vocab_multiple

    def cross_entropy(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch[0], batch[1]  # (B, T), (B, T)
        return lm_cross_entropy(model, x, y, chunked=self.chunked, vocab_multiple=self.vocab_multiple)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        ce = self.cross_entropy(model, batch)
        aux = aux_loss(model)
        return ce if aux is None else ce + aux

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[Batch]) -> dict[str, float]:
        """``loss`` (cross-entropy only) and ``perplexity``; ``aux_loss`` too for a model that has one."""
        losses, aux = [], []
        for b in batches:
            losses.append(float(self.cross_entropy(model, b)))
            a = aux_loss(model)
            if a is not None:
                aux.append(float(a))
        loss = sum(losses) / max(1, len(losses))
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if aux:
            out["aux_loss"] = sum(aux) / len(aux)
        return out


@dataclass
class TrainResult:
    """What :func:`train_loop` returns: where it stopped and why, the best validation loss, every record."""

    step: int
    tokens: int
    best_val_loss: float | None
    best_step: int | None
    stopped_because: str  # max_steps, epochs, max_time, early_stopping, target_loss or interrupted
    diagnosis: Diagnosis | None
    records: list[dict] = field(default_factory=list)


class TrainingDiverged(GptlabError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class Schedule:
    """The run's length and learning-rate schedule (warmup + cosine), computed once from its settings."""

    def __init__(self, cfg: TrainConfig, train: IndexedBatches):
        self.cfg = cfg
        self.steps_per_epoch = cfg.steps_per_epoch(len(train))
        self.max_steps = cfg.total_steps(self.steps_per_epoch)
        self.horizon = self.max_steps if self.max_steps is not None else 10**9  # time-only runs: no decay horizon
        self.warmup = (cfg.warmup_steps if cfg.warmup_steps is not None
                       else (max(1, self.horizon // 20) if self.max_steps else 100))
        self.min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10

    def lr(self, step: int) -> float:
        """Learning rate of 0-based optimizer step ``step``."""
        return lr_at(step, lr=self.cfg.lr, warmup_steps=self.warmup, max_steps=self.horizon, min_lr=self.min_lr)

    def stop_reason(self, c: Counters, t_start: float) -> str | None:
        """``"max_steps"`` / ``"epochs"`` / ``"max_time"`` once that limit is reached, else None."""
        if self.max_steps is not None and c.step >= self.max_steps:
            return "max_steps" if self.cfg.max_steps is not None else "epochs"
        if self.cfg.max_time is not None and time.perf_counter() - t_start >= self.cfg.max_time:
            return "max_time"
        return None


def optimizer_step(par: Parallel, trained: nn.Module, train: IndexedBatches, task: Task, optimizer, scaler,
                   cfg: TrainConfig, c: Counters, lr: float, autocast, run: Path) -> tuple[torch.Tensor, int]:
    """One optimizer step over ``grad_accum`` micro-batches; returns (loss, a 0-d tensor, and tokens seen),
    over all ranks. ``trained``: what the optimizer holds (the model, with the task's own modules if any).

    One host synchronisation per step in a single process: the divergence check before the optimizer
    step (the loss is read back only where it is logged); several processes also sum loss and tokens.
    """
    device = next(par.model.parameters()).device
    for g in optimizer.param_groups:
        g["lr"] = lr
    trained.train()
    loss_sum, n_tokens = torch.zeros((), device=device), 0
    for k in range(cfg.grad_accum):
        batch = to_device(train.batch(c.step * cfg.grad_accum + k), device)
        with par.grad_sync(last=k == cfg.grad_accum - 1):  # gradients cross ranks once per step
            with autocast():
                loss = task.loss(par.fwd, batch) / cfg.grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += loss.detach().float()
        n_tokens += int(batch[0].numel())
    if par.dist.active and par.dist.world > 1:  # the global batch's mean loss and tokens
        total, n = all_sum([float(loss_sum), n_tokens], par.dist)
        loss_sum, n_tokens = torch.tensor(total / par.dist.world), int(n)
    if not torch.isfinite(loss_sum):  # before the weights change: the last checkpoint stays the last good one
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(
            f"loss became {float(loss_sum)} at step {c.step + 1}; stopped. The last good "
            f"checkpoint is kept in {run / 'checkpoints'}. Lower the learning rate (now {lr:.2e}) "
            "or use --precision fp32, then --resume")
    if scaler:
        scaler.unscale_(optimizer)
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, n_tokens


RANK_SEED = 7919  # rank r draws its dropout masks from seed + r * RANK_SEED (rank 0: the run's seed)


def _resume(par: Parallel, optimizer, cfg: TrainConfig, resume_state: dict[str, Any] | None,
            aux: nn.Module | None) -> Counters:
    """The counters to start from: a checkpoint's (optimizer, RNG and ``aux`` restored too), or zero
    (seeded per rank)."""
    rank = par.dist.rank
    if resume_state is None:
        torch.manual_seed(cfg.seed + rank * RANK_SEED)  # dropout masks follow the run's seed, differ per rank
        return Counters()
    if aux is not None:
        if "aux" not in resume_state:
            raise GptlabError("the checkpoint has no saved auxiliary modules (e.g. distillation's feature "
                              "projections) to resume them from; start a new run with --out")
        aux.load_state_dict(resume_state["aux"])
    c = Counters.from_state(resume_state)
    if resume_state.get("sharded"):  # written by several processes: DCP reshards to this many
        ck = Path(resume_state["checkpoint"])
        load_sharded_optimizer(par.model, optimizer, ck)
        rng = load_rank_rng(ck, rank)
    else:
        load_full_optimizer(par, optimizer, resume_state["optimizer"])
        rng = resume_state["rng"] if rank == 0 else None
    if rng is not None:
        set_rng_state(rng)
    else:  # a rank the saving run did not have: a fresh, reproducible stream
        torch.manual_seed(cfg.seed + rank * RANK_SEED + c.step)
    return c


def _autocast(model: nn.Module, cfg: TrainConfig):
    """The autocast dtype for ``cfg.precision`` on the model's device (None: fp32) and a context factory."""
    device = next(model.parameters()).device
    amp = autocast_dtype(device, cfg.precision)
    if amp is None:
        return None, contextlib.nullcontext
    return amp, lambda: torch.autocast(device.type, dtype=amp)


def _trained(model: nn.Module, aux: nn.Module | None, par: Parallel) -> nn.Module:
    """What the optimizer and clipping see: the model, with the task's own modules if it has any."""
    if aux is None:
        return model
    if par.dist.active:
        raise GptlabError("this task trains modules of its own besides the model (distillation's feature "
                          "projections), which are not parallelized yet: run it in one process (drop --nproc)")
    return nn.ModuleList([model, aux])


def train_loop(model: nn.Module, train: IndexedBatches, val: IndexedBatches | None, cfg: TrainConfig,
               run_dir: str | Path, *, task: Task | None = None, tokenizer=None,
               resume_state: dict[str, Any] | None = None, sample_fn: Callable[[nn.Module], str] | None = None,
               save_model: Callable[[nn.Module, Path], None] | None = None, progress: bool = True,
               echo: Callable[[str], None] | None = None, is_main: bool = True,
               on_checkpoint: Callable[[], None] | None = None, loggers: Sequence[str] = (),
               aux: nn.Module | None = None, parallel: Parallel | None = None) -> TrainResult:
    """Train ``model`` on batches from ``train``, evaluating on ``val``; write the run directory.

    Args:
        model: the model, already on its device (fp32 master weights).
        train: batch source for training (batch ``i`` is a pure function of ``i``).
        val: batch source for validation, or None.
        cfg: the run's settings.
        run_dir: where metrics, plots, samples and checkpoints go.
        task: the loss/metrics plug-in (default: language modeling).
        tokenizer: saved with every checkpoint so the model directory is self-contained.
        resume_state: the ``state.pt`` of a checkpoint to continue from exactly.
        sample_fn: called at each evaluation; its text is printed and appended to samples.txt.
        save_model: how to write a model directory (default: gptlab's native format).
        progress: show a progress bar.
        echo: where status lines go.
        is_main: this process is the main rank: only it prints and writes files.
        loggers: also log each evaluation to these: csv, tensorboard, wandb (:mod:`gptlab.training.loggers`).
        aux: trainable modules the task owns besides the model (distillation's feature projections): optimized
            with it, saved in each checkpoint's ``state.pt`` and restored on resume, not in the model directory.
        parallel: how ``model`` runs across processes (:func:`gptlab.training.parallel.parallelize`).
    """
    par = parallel or single(model)
    is_main = is_main and par.dist.is_main
    cfg.validate(has_val=val is not None)
    echo = (echo or (lambda msg: print(msg, flush=True))) if is_main else (lambda msg: None)
    task, run = task or LanguageModeling(cfg.chunked_loss, cfg.vocab_multiple), Path(run_dir)
    if is_main:
        run.mkdir(parents=True, exist_ok=True)
    amp, autocast = _autocast(model, cfg)
    sched = Schedule(cfg, train)
    optimizer = build_optimizer(trained := _trained(model, aux, par), cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    scaler = torch.amp.GradScaler(next(model.parameters()).device.type) if amp == torch.float16 else None
    par = dataclasses.replace(par, fwd=compile_model(par.fwd)) if cfg.compile else par
    c = _resume(par, optimizer, cfg, resume_state, aux)
    resumed_at = c.step if resume_state is not None else None
    bar = Progress(progress, sched.max_steps, c, cfg.log_every, echo, is_main)
    evaluation = Evaluation(run, model, task, train, val, cfg, optimizer, tokenizer, autocast=autocast,
                            save_model=save_model or (lambda m, d: save_model_dir(m, d, tokenizer)),
                            samples=Samples(run, sample_fn, resumed_at, is_main), progress=bar,
                            resumed_at=resumed_at, is_main=is_main, on_checkpoint=on_checkpoint, loggers=loggers,
                            aux=aux, parallel=par)
    lr, speed, stopped, t_start = sched.lr(max(c.step - 1, 0)), Throughput(), None, time.perf_counter() - c.elapsed
    step_rng, tokens_at_step_start = rng_state(), c.tokens
    try:
        with flush_denormals(next(model.parameters()).device, cfg.flush_denormals):
            while (stopped := agree(sched.stop_reason(c, t_start), par.dist, cfg.max_time is not None)) is None:
                t0 = time.perf_counter()
                step_rng, tokens_at_step_start = rng_state(), c.tokens  # to replay this step exactly if interrupted
                lr = sched.lr(c.step)
                loss, n_tokens = optimizer_step(par, trained, train, task, optimizer, scaler, cfg, c, lr, autocast, run)
                c.step, c.tokens = c.step + 1, c.tokens + n_tokens
                speed.add(n_tokens, time.perf_counter() - t0)
                c.elapsed = time.perf_counter() - t_start
                bar.update(c, loss, speed)
                if (c.step % cfg.eval_every == 0 or c.step == sched.max_steps) and (why := evaluation(c, lr, speed)):
                    stopped = why  # early_stopping or target_loss
                    break
    except KeyboardInterrupt:
        stopped = "interrupted"
        optimizer.zero_grad(set_to_none=True)
        c.tokens = tokens_at_step_start
        if par.dist.active:  # the ranks stopped at different points: no common step to save
            echo(f"\ninterrupted at step {c.step}; continue from the last checkpoint with --resume {run}")
            raise
        evaluation.checkpoint(c, rng=step_rng)
        echo(f"\ninterrupted at step {c.step}; checkpoint saved. Continue with --resume {run}")
    finally:
        bar.close()
    evaluation.finish(c, lr, speed, stopped)
    evaluation.close()
    diag = diagnose(evaluation.log.records, getattr(getattr(model, "cfg", None), "vocab_size", None))
    return TrainResult(c.step, c.tokens, c.best_val, c.best_step, stopped, diag, evaluation.log.records)
