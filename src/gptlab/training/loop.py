"""The one training loop.

Pretraining, classification, instruction tuning, LoRA and distillation differ
in three things only — the batches, the loss, and which parameters train — so
they all run through :func:`fit` with a different :class:`Task` and batch
source. The loop reads top to bottom:

    for each optimizer step:
        lr <- warmup/cosine schedule
        for each micro-batch (gradient accumulation): loss = task.loss(model, batch); backward
        clip gradients; optimizer step
        every eval_every steps: evaluate train/val, sample, log, plot, checkpoint, early stop
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.device import autocast_dtype, pick_device
from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_text
from gptlab.training.batches import Batch, IndexedBatches
from gptlab.training.checkpoint import rng_state, save_checkpoint, set_rng_state
from gptlab.training.optim import build_optimizer, lr_at
from gptlab.training.report import Diagnosis, MetricsLog, diagnose, plot_losses
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
    eval_every: int = 50
    eval_iters: int = 10
    log_every: int = 10
    patience: int | None = None  # early stopping: evaluations without val improvement
    seed: int = 123
    device: str = "auto"

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

    def validate(self) -> None:
        """Raise a GptlabError naming the first setting that cannot work."""
        if self.max_steps is None and self.epochs is None and self.max_time is None:
            raise GptlabError("say how long to train: give max_steps, epochs or max_time")
        self.validate_limits()
        for f in ("batch_size", "grad_accum", "eval_every", "eval_iters", "log_every"):
            if getattr(self, f) < 1:
                raise GptlabError(f"{f}={getattr(self, f)} must be >= 1")
        if not self.lr > 0:
            raise GptlabError(f"lr={self.lr} must be > 0")
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


class LanguageModeling:
    """Next-token cross-entropy over all positions (targets of -100 are ignored)."""

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = model(x)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[Batch]) -> dict[str, float]:
        losses = [float(self.loss(model, b)) for b in batches]
        loss = sum(losses) / max(1, len(losses))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@dataclass
class TrainResult:
    step: int
    tokens: int
    best_val_loss: float | None
    best_step: int | None
    stopped_because: str
    diagnosis: Diagnosis | None
    records: list[dict] = field(default_factory=list)


class TrainingDiverged(GptlabError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def _to(batch: Batch, device: torch.device) -> Batch:
    return tuple(t.to(device, non_blocking=True) for t in batch)


def fit(model: nn.Module, train: IndexedBatches, val: IndexedBatches | None, cfg: TrainConfig,
        run_dir: str | Path, *, task: Task | None = None, tokenizer=None,
        resume_state: dict[str, Any] | None = None,
        sample_fn: Callable[[nn.Module], str] | None = None,
        save_model: Callable[[nn.Module, Path], None] | None = None,
        progress: bool = True, echo: Callable[[str], None] | None = None) -> TrainResult:
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
    """
    cfg.validate()
    echo = echo or (lambda msg: print(msg, flush=True))
    task = task or LanguageModeling()
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    amp = autocast_dtype(device, cfg.precision)
    save_model = save_model or (lambda m, d: save_model_dir(m, d, tokenizer))

    micro_per_epoch = len(train)
    steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum)
    max_steps = cfg.max_steps
    if max_steps is None and cfg.epochs is not None:
        max_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    horizon = max_steps if max_steps is not None else 10**9  # time-only runs: no decay horizon
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else (max(1, horizon // 20) if max_steps else 100)
    min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10

    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    fwd = torch.compile(model) if cfg.compile else model

    step, tokens, best_val, best_step, bad_evals, elapsed = 0, 0, None, None, 0, 0.0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        step, tokens = resume_state["step"], resume_state["tokens"]
        best_val, best_step = resume_state.get("best_val"), resume_state.get("best_step")
        bad_evals, elapsed = resume_state.get("bad_evals", 0), resume_state.get("elapsed", 0.0)
        set_rng_state(resume_state["rng"])
    else:
        torch.manual_seed(cfg.seed)  # dropout masks follow the run's seed
    log = MetricsLog(run / "metrics.jsonl", resume_step=step if resume_state else None)
    samples_path = run / "samples.txt"
    if resume_state is None and samples_path.exists():
        samples_path.unlink()
    eval_train = train.fixed_batches(cfg.eval_iters)
    eval_val = val.fixed_batches(cfg.eval_iters) if val is not None else None
    tokens_per_epoch = micro_per_epoch * train.bs * max(1, train.tokens_per_item)

    def checkpoint_state() -> dict[str, Any]:
        return {"step": step, "tokens": tokens, "best_val": best_val, "best_step": best_step,
                "bad_evals": bad_evals, "elapsed": elapsed, "config": dataclasses.asdict(cfg)}

    lr = lr_at(max(step - 1, 0), lr=cfg.lr, warmup_steps=warmup, max_steps=horizon, min_lr=min_lr)
    bar = None

    def evaluate_and_save() -> bool:
        """Evaluate train/val, log, sample, plot, keep the best model, checkpoint; True -> patience ran out."""
        nonlocal window_tokens, window_time, best_val, best_step, bad_evals
        model.eval()
        with torch.no_grad(), autocast():
            tr = task.evaluate(model, [_to(b, device) for b in eval_train])
            va = task.evaluate(model, [_to(b, device) for b in eval_val]) if eval_val else {}
        rec = {"step": step, "tokens": tokens, "epoch": round(train.epoch_of(step * cfg.grad_accum), 4),
               "lr": lr, "train_loss": tr["loss"], "val_loss": va.get("loss"),
               "tokens_per_s": window_tokens / max(window_time, 1e-9), "elapsed_s": round(elapsed, 2)}
        rec.update({f"train_{k}": v for k, v in tr.items() if k != "loss"})
        rec.update({f"val_{k}": v for k, v in va.items() if k != "loss"})
        window_tokens, window_time = 0, 0.0
        log.log(rec)
        line = f"step {step}: train loss {tr['loss']:.3f}"
        if va:
            line += f", val loss {va['loss']:.3f}"
            extra = {k: v for k, v in va.items() if k not in ("loss", "perplexity")}
            line += "".join(f", val {k} {v:.3f}" for k, v in extra.items())
        line += f", {rec['tokens_per_s']:,.0f} tok/s"
        (bar.write if bar is not None else echo)(line)
        if sample_fn is not None:
            text = sample_fn(model)
            (bar.write if bar is not None else echo)(f"  sample: {text!r}")
            prev = samples_path.read_text() if samples_path.exists() else ""
            atomic_write_text(samples_path, prev + f"--- step {step} ---\n{text}\n")
        plot_losses(log.records, run / "loss.png", tokens_per_epoch)
        improved = False
        score = va.get("loss") if va else None
        if score is not None:
            if best_val is None or score < best_val:
                best_val, best_step, bad_evals, improved = score, step, 0, True
            else:
                bad_evals += 1
        if improved or val is None:
            save_model(model, run / "model")
        save_checkpoint(run, model, tokenizer, optimizer, checkpoint_state())
        return cfg.patience is not None and bad_evals >= cfg.patience

    plain_progress = progress and not sys.stderr.isatty()  # logs/CI: a line every log_every steps
    if progress and not plain_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, initial=step, unit="step", dynamic_ncols=True, leave=True)
    stopped = "max_steps"
    window_tokens, window_time, last_loss = 0, 0.0, float("nan")
    t_start = time.perf_counter() - elapsed
    step_rng, tokens_at_step_start = rng_state(), tokens
    start_step, start_elapsed = step, elapsed
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else contextlib.nullcontext
    try:
        while True:
            if max_steps is not None and step >= max_steps:
                stopped = "max_steps"
                break
            if cfg.max_time is not None and time.perf_counter() - t_start >= cfg.max_time:
                stopped = "max_time"
                break
            t0 = time.perf_counter()
            step_rng, tokens_at_step_start = rng_state(), tokens  # to replay this step exactly if it is interrupted
            lr = lr_at(step, lr=cfg.lr, warmup_steps=warmup, max_steps=horizon, min_lr=min_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            model.train()
            loss_sum = 0.0
            for k in range(cfg.grad_accum):
                batch = _to(train.batch(step * cfg.grad_accum + k), device)
                with autocast():
                    loss = task.loss(fwd, batch) / cfg.grad_accum
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {float(loss.detach() * cfg.grad_accum)} at step {step + 1}; stopped. The last good "
                        f"checkpoint is kept in {run / 'checkpoints'}. Lower the learning rate (now {lr:.2e}) "
                        "or use --precision fp32, then --resume")
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += float(loss.detach())
                tokens += int(batch[0].numel())
                window_tokens += int(batch[0].numel())
            if scaler:
                scaler.unscale_(optimizer)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = loss_sum
            window_time += time.perf_counter() - t0
            elapsed = time.perf_counter() - t_start
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{window_tokens / max(window_time, 1e-9):,.0f}",
                                refresh=False)
            elif plain_progress and step % cfg.log_every == 0:
                rate = (step - start_step) / max(elapsed - start_elapsed, 1e-9)
                eta = f", eta {(max_steps - step) / rate:.0f}s" if max_steps and rate > 0 else ""
                echo(f"step {step}{f'/{max_steps}' if max_steps else ''}: loss {last_loss:.3f}, "
                     f"{window_tokens / max(window_time, 1e-9):,.0f} tok/s{eta}")

            if step % cfg.eval_every == 0 or step == max_steps:
                if evaluate_and_save():
                    stopped = "early_stopping"
                    (bar.write if bar is not None else echo)(
                        f"early stopping: no val improvement in {cfg.patience} evaluations (best step {best_step})")
                    break
    except KeyboardInterrupt:
        stopped = "interrupted"
        optimizer.zero_grad(set_to_none=True)
        tokens = tokens_at_step_start
        save_checkpoint(run, model, tokenizer, optimizer, checkpoint_state(), rng=step_rng)
        echo(f"\ninterrupted at step {step}; checkpoint saved. Continue with --resume {run}")
    finally:
        if bar is not None:
            bar.close()
            bar = None  # a final evaluation below prints plain lines
    # A time limit (or a resumed run already past --max-steps) may stop between evaluations: evaluate
    # the final state too, so metrics.jsonl, loss.png, samples.txt and the checkpoint describe it.
    last = log.records[-1]["step"] if log.records else -1
    if stopped in ("max_time", "max_steps") and last != step and step > 0:
        evaluate_and_save()
    if not (run / "model" / "config.json").exists() and step > 0:
        save_model(model, run / "model")
    diag = diagnose(log.records, getattr(getattr(model, "cfg", None), "vocab_size", None))
    return TrainResult(step, tokens, best_val, best_step, stopped, diag, log.records)
