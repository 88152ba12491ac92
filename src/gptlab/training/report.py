"""Metrics log, the loss-curve plot, and the plain-words diagnosis of a run."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from gptlab.fileio import atomic_save, atomic_write_text


def read_records(path: Path, up_to_step: int) -> list[dict]:
    """The records of ``metrics.jsonl`` at ``path`` up to step ``up_to_step`` (none if it does not exist)."""
    if not path.exists():
        return []
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [r for r in records if r.get("step", 0) <= up_to_step]


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, flushed as it goes.

    On resume, lines after the resumed step are dropped (rewritten atomically)
    so the log matches an uninterrupted run.
    """

    def __init__(self, path: Path, resume_step: int | None = None, write: bool = True):
        self.path, self.write = path, write  # write=False: records kept in memory only (not the main rank)
        self.records: list[dict] = []
        if resume_step is not None and path.exists():
            self.records = read_records(path, resume_step)
            if write:
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))
        elif path.exists() and write:
            path.unlink()

    def log(self, record: dict) -> None:
        """Add one record; the file is rewritten atomically (it holds one line per evaluation)."""
        self.records.append(record)
        if self.write:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def evals(self) -> list[dict]:
        return [r for r in self.records if r.get("val_loss") is not None or r.get("train_loss") is not None]


def plot_curves(train: list[tuple[float, float]], val: list[tuple[float, float]], path: Path, *,
                xlabel: str, ylabel: str, legend_loc: str = "upper right",
                secondary: tuple[str, float] | None = None) -> None:
    """Training (solid) and validation (dash-dot) curves of (x, y) points, saved as a PNG atomically.

    ``secondary=(label, x_per_unit)`` adds a top axis in other units (epochs over tokens).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not train:
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(*zip(*train), label=f"Training {ylabel.lower()}")
    if val:
        ax.plot(*zip(*val), linestyle="-.", label=f"Validation {ylabel.lower()}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc=legend_loc)
    if secondary:
        label, per = secondary
        top = ax.secondary_xaxis("top", functions=(lambda t: t / per, lambda e: e * per))
        top.set_xlabel(label)
    fig.tight_layout()
    atomic_save(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


def plot_losses(records: list[dict], path: Path, tokens_per_epoch: float | None = None) -> None:
    """Train and val loss against tokens seen; epochs on a second x axis (the course's figure)."""
    train = [(r["tokens"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    val = [(r["tokens"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    plot_curves(train, val, path, xlabel="Tokens seen", ylabel="Loss",
                secondary=("Epochs", tokens_per_epoch) if tokens_per_epoch else None)


@dataclass
class Diagnosis:
    verdict: str  # healthy | overfitting | underfitting | unstable | too short
    message: str
    best_step: int | None = None


def diagnose(records: list[dict], vocab_size: int | None = None) -> Diagnosis:
    """Read the loss curves the way the course teaches, and say what they show.

    - unstable: a non-finite loss, or training loss jumping up by >30% between
      evaluations more than once, or ending above where it started;
    - overfitting: validation loss rose >3% above its minimum while training loss
      kept falling; the best step is named (its checkpoint is RUN/model);
    - underfitting: training loss still falling fast at the end (>3% over the last
      quarter of evaluations), validation loss still falling (>1% over the last quarter, or >0.5% to a new best at the last evaluation),
      or training loss barely below the uniform-guess loss ln(V);
    - healthy: both losses fell and flattened, with a modest gap.
    """
    evals = [r for r in records if r.get("train_loss") is not None]
    if len(evals) < 3:
        return Diagnosis("too short", "too few evaluations to judge the curves (need at least 3); "
                         "train longer or evaluate more often (--eval-every)")
    tr = [r["train_loss"] for r in evals]
    if any(not math.isfinite(x) for x in tr):
        return Diagnosis("unstable", "the loss became NaN/inf: lower the learning rate, keep gradient "
                         "clipping on, or use fp32")
    jumps = sum(1 for a, b in zip(tr, tr[1:]) if b > a * 1.3)
    if jumps >= 2 or tr[-1] > tr[0]:
        return Diagnosis("unstable", f"training loss jumped up {jumps} time(s) and went {tr[0]:.2f} -> {tr[-1]:.2f}: "
                         "the run is unstable; lower the learning rate or raise warmup")
    val = [(r["step"], r["val_loss"]) for r in evals if r.get("val_loss") is not None]
    if len(val) >= 3:
        best_step, best = min(val, key=lambda sv: sv[1])
        last_step, last = val[-1]
        after = [r["train_loss"] for r in evals if r["step"] >= best_step]
        if last > best * 1.03 and after[-1] < after[0]:
            return Diagnosis("overfitting", f"overfitting: validation loss rose from {best:.3f} at step {best_step} "
                             f"to {last:.3f} at step {last_step} while training loss kept falling "
                             f"({after[0]:.3f} -> {after[-1]:.3f}). The best checkpoint (step {best_step}) is the one "
                             "kept as the model; more data, dropout or weight decay would help.", best_step)
    q = max(2, len(tr) // 4)
    recent_drop = (tr[-q] - tr[-1]) / max(tr[-q], 1e-9)
    uniform = math.log(vocab_size) if vocab_size else None
    if uniform and tr[-1] > 0.85 * uniform:
        return Diagnosis("underfitting", f"underfitting: training loss {tr[-1]:.2f} is barely below the "
                         f"uniform-guess loss ln(V) = {uniform:.2f}; train much longer or raise the learning rate")
    if recent_drop > 0.03:
        gap = f", validation {val[-1][1]:.3f}" if val else ""
        return Diagnosis("underfitting", f"still improving: training loss fell {100 * recent_drop:.1f}% over the last "
                         f"quarter of the run (now {tr[-1]:.3f}{gap}); the model is not done learning - train longer")
    vq = max(2, len(val) // 4)
    val_drop = (val[-vq][1] - val[-1][1]) / max(val[-vq][1], 1e-9) if len(val) >= 3 else 0.0
    best_last = len(val) >= 3 and val[-1][1] <= min(v for _, v in val)  # the newest evaluation is the best yet
    if val_drop > 0.01 or (best_last and val_drop > 0.005):
        drops = " -> ".join(f"{v:.2f}" for _, v in val[-max(vq, 3):])
        return Diagnosis("underfitting", f"still improving: validation loss is still falling ({drops} over the last "
                         "evaluations); the model is not done learning - train longer")
    gap_msg = ""
    if val:
        gap = val[-1][1] - tr[-1]
        gap_msg = f", validation {val[-1][1]:.3f} (gap {gap:+.3f})"
    return Diagnosis("healthy", f"healthy: losses fell and flattened (training {tr[0]:.3f} -> {tr[-1]:.3f}{gap_msg}); "
                     "for lower loss use more data or a larger model")
