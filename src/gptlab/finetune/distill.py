"""Knowledge distillation: a small student learns from a larger teacher's predictions.

Two kinds (the lecture's "response-based" and "sequence-level" distillation):

Logit (word-level) distillation, Hinton et al. 2015 (https://arxiv.org/abs/1503.02531).
Teacher and student read the same tokens; the student matches the teacher's
softened next-token distribution as well as the true next token:

    loss = (1 − α) · CE(student, labels) + α · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

T > 1 softens both distributions so the student also learns the teacher's
ranking of the wrong tokens; T² keeps the gradient scale comparable to the CE
term as T changes. α = 0 is ordinary training.

Sequence-level distillation (Kim & Rush 2016, https://arxiv.org/abs/1606.07947):
the teacher *generates* a corpus, and the student trains on it with the
ordinary next-token loss (black-box: only the teacher's text is needed).

Both need one vocabulary: token i must mean the same thing to both models,
so the tokenizers are checked to be identical first.

A run records its settings in OUT/distill_config.json (and, in sequence
mode, the teacher's text in OUT/teacher_tokens.npy), so ``--resume OUT``
continues it exactly from the latest checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_save
from gptlab.finetune.common import load_model_and_tokenizer, restore_checkpoint
from gptlab.training.batches import Batch
from gptlab.training.driver import Job, run_recipe
from gptlab.training.loop import TrainConfig
from gptlab.training.settings import RunSettings, api, command, from_record, recorded_ref, train_config_from

IGNORE = -100
CONFIG_FILE = "distill_config.json"  # the run's settings, for --resume
TEACHER_TOKENS = "teacher_tokens.npy"  # sequence mode: the teacher's generated training text
DEFAULT_STEPS = 200
PROBE = "The quick brown fox jumps over the lazy dog. 1234 <|endoftext|> Über café — naïve 東京"


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
                      alpha: float = 0.5, temperature: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ce, kl) for logits (B, T, V) and targets (B, T) (-100 positions ignored).

    ``kl`` is KL(p_teacher ‖ p_student) at temperature T, averaged over the
    counted positions; ``total = (1 − α)·ce + α·T²·kl``.
    """
    V = student_logits.shape[-1]
    if teacher_logits.shape[-1] != V:
        raise GptlabError(f"teacher vocabulary {teacher_logits.shape[-1]} != student vocabulary {V}; "
                          "distillation needs the same tokenizer")
    s = student_logits.float().flatten(0, 1)  # (B*T, V)
    t = teacher_logits.float().flatten(0, 1)  # (B*T, V)
    y = targets.flatten()  # (B*T,)
    keep = y != IGNORE
    n = keep.sum().clamp(min=1)
    ce = F.cross_entropy(s, y, ignore_index=IGNORE, reduction="sum") / n
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kl_per_token = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # (B*T,)
    kl = (kl_per_token * keep).sum() / n
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl, ce, kl


class DistillationTask:
    """The :class:`gptlab.training.loop.Task` for logit distillation (teacher frozen, in eval mode).

    ``evaluate`` reports the student's plain cross-entropy as ``loss`` (what
    early stopping and model selection should look at), plus ``kl`` and
    ``distill_loss``.
    """

    def __init__(self, teacher: nn.Module, alpha: float = 0.5, temperature: float = 2.0):
        if not 0.0 <= alpha <= 1.0:
            raise GptlabError(f"alpha={alpha} must be in [0, 1] (0 = no teacher, 1 = teacher only)")
        if temperature <= 0:
            raise GptlabError(f"temperature={temperature} must be > 0")
        self.teacher, self.alpha, self.T = teacher.eval(), alpha, temperature
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def _parts(self, model: nn.Module, batch: Batch):
        x, y = batch[0], batch[1]
        with torch.no_grad():
            t = self.teacher(x)  # (B, T, V)
        return distillation_loss(model(x), t, y, alpha=self.alpha, temperature=self.T)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self._parts(model, batch)[0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[Batch]) -> dict[str, float]:
        parts = [tuple(float(v) for v in self._parts(model, b)) for b in batches]
        m = [sum(p[i] for p in parts) / max(1, len(parts)) for i in range(3)]
        return {"loss": m[1], "perplexity": math.exp(min(m[1], 50.0)), "kl": m[2], "distill_loss": m[0]}


def _ids(tok, text: str) -> list[int] | None:
    try:
        return tok.encode(text, allowed_special="none")
    except GptlabError:  # e.g. a character vocabulary without some probe characters
        return None


def _pieces(tok) -> list[str]:
    """The text of a spread of ids (all of them for small vocabularies)."""
    V = tok.vocab_size
    ids = range(V) if V <= 4096 else range(0, V, max(1, V // 4096))
    return [tok.decode([i]) for i in ids]


def check_same_tokenizer(teacher_tok, student_tok) -> None:
    """Raise a clear error unless both tokenizers give the same ids (vocabulary, specials, a probe text)."""
    problems = []
    if teacher_tok.vocab_size != student_tok.vocab_size:
        problems.append(f"vocab sizes {teacher_tok.vocab_size} vs {student_tok.vocab_size}")
    elif teacher_tok.special_tokens != student_tok.special_tokens:
        problems.append("different special tokens")
    elif _ids(teacher_tok, PROBE) != _ids(student_tok, PROBE) or _pieces(teacher_tok) != _pieces(student_tok):
        problems.append("the same text encodes to different ids")
    if problems:
        raise GptlabError("teacher and student must share one tokenizer for distillation, but they differ ("
                          + "; ".join(problems) + "); pick a student of the teacher's family, or a --student "
                          "preset (it takes the teacher's tokenizer)")


@torch.no_grad()
def teacher_corpus(teacher: nn.Module, tok, prompts: list[list[int]], max_new_tokens: int, *,
                   temperature: float = 1.0, top_k: int | None = 50, seed: int = 0) -> np.ndarray:
    """Sequence-level distillation data: the teacher's continuation of each prompt, joined by end-of-text.

    A continuation ends at the teacher's StopSet (eos of tokenizer and config, its chat template's
    end-of-turn token), as ``gptlab generate`` would end it.
    """
    from gptlab.inference import StopSet, generate_events

    if not prompts:
        raise GptlabError("sequence-level distillation needs at least one prompt")
    stops = StopSet(StopSet.for_model(tok, teacher.cfg).token_ids)  # token ids only: the corpus is ids
    sep = tok.eos_id if tok.eos_id is not None else 0
    out: list[int] = []
    for i, p in enumerate(prompts):
        events = generate_events(teacher, torch.tensor(p), max_new_tokens, stops=stops, temperature=temperature,
                                 top_k=top_k, seed=seed + i)
        out += p + [e.token_id for e in events if e.finish_reason != "stop" and e.token_id is not None] + [sep]
    return np.asarray(out, dtype=np.int64)


def _student(student: str, tok, device, context_length: int | None):
    """A pretrained student REF, or a preset name built fresh with the teacher tokenizer's vocabulary."""
    from gptlab.models import build_model, get_preset
    from gptlab.models.config import ConfigError

    try:
        cfg = get_preset(student)
    except (ConfigError, KeyError, GptlabError):
        cfg = None
    if cfg is None:
        from gptlab.finetune.common import load_model_and_tokenizer

        model, stok = load_model_and_tokenizer(student, device)
        return model, stok
    changes = {"vocab_size": tok.vocab_size}
    if context_length:
        changes["context_length"] = context_length
    return build_model(cfg.replace(**changes)).to(device), tok


@dataclass
class DistillSettings(RunSettings):
    """Knowledge distillation: train a small student on a teacher's predictions (or generated text).

    Logit mode minimises (1 - alpha) * CE(student, labels) + alpha * T^2 *
    KL(softmax(teacher/T) || softmax(student/T)); sequence mode trains the student
    on text the teacher generates (kept in OUT/teacher_tokens.npy). Teacher and
    student must share the tokenizer. OUT/distill_config.json records the run's
    settings, which --resume reads back.

    Attributes:
        teacher: the teacher model: run/model dir, Hugging Face dir, .gguf file or pkg:PACKAGE/PATH.
        student: a pretrained student REF, or a preset name (e.g. llama-micro) built fresh with the teacher's vocabulary.
        data: the text corpus: a file, a directory of .txt files, or a named corpus (the-verdict, tinyshakespeare).
        mode: logits (word-level distillation) or sequence (the teacher generates the training text).
        alpha: weight of the teacher term (0 = ordinary training, 1 = teacher only).
        temperature: softening temperature T of both distributions.
        context_length: tokens per training window.
        stride: distance between window starts (default: the context length, no overlap).
        max_steps: optimizer steps (default 200).
        batch_size: windows per batch.
        lr: peak learning rate (AdamW, warmup + cosine over max_steps).
        weight_decay: AdamW weight decay.
        eval_every: evaluate and checkpoint every N steps.
        eval_iters: batches per evaluation.
        val_ratio: fraction of the corpus held out for validation.
        prompts: sequence mode: how many teacher generations.
        gen_tokens: sequence mode: tokens generated per prompt.
        resume: continue the run in this directory from its latest checkpoint, with the settings it was
            started with (only --max-steps, the new total, may change; the schedule follows it).
    """

    POSITIVE = ('prompts', 'gen_tokens', 'context_length', 'temperature')

    teacher: str | None = None
    student: str | None = None
    data: str | None = None
    out: str = "runs/distill"
    mode: str = "logits"
    alpha: float = 0.5
    temperature: float = 2.0
    context_length: int = 128
    stride: int | None = None
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_iters: int = 10
    val_ratio: float = 0.1
    prompts: int = 64
    gen_tokens: int = 128


RECORDED = ("teacher", "student", "data", "mode", "alpha", "temperature", "context_length", "stride", "val_ratio",
            "prompts", "gen_tokens")


def _save_tokens(path: Path, ids: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temp name
            np.save(f, ids)

    atomic_save(path, write)


def _sequence_data(s: DistillSettings, t_model, t_tok, train_ids: np.ndarray, seed: int, resuming) -> np.ndarray:
    """Sequence mode's training tokens: the teacher's text saved when the run started, or a new sample."""
    if resuming is not None:  # the text the teacher wrote when the run started, not a new sample
        saved = resuming.path / TEACHER_TOKENS
        if not saved.is_file():
            raise GptlabError(f"{resuming.path} has no {TEACHER_TOKENS} (the teacher's generated text) to resume "
                              "sequence-level distillation from; start a new run with --out")
        return np.load(saved)
    # Prompts: the first tokens of evenly spaced training windows; the teacher writes the rest.
    starts = np.linspace(0, max(0, len(train_ids) - 16), num=s.prompts).astype(int)
    return teacher_corpus(t_model, t_tok, [train_ids[i:i + 8].tolist() for i in starts],
                          min(s.gen_tokens, t_model.cfg.context_length - 8), seed=seed)


class Distillation:
    """The distillation recipe (see the module docstring)."""

    config_file, what, limits = CONFIG_FILE, "distillation", ("max_steps",)

    @property
    def refs(self) -> dict:
        from gptlab.data.corpus import BUILTIN
        from gptlab.data.download import DATASETS
        from gptlab.models.config import list_presets

        return {"teacher": (), "student": tuple(list_presets()), "data": (BUILTIN, *DATASETS)}

    def check(self, s: DistillSettings) -> None:
        if not s.teacher or not s.student:
            raise GptlabError("give --teacher REF and --student REF|PRESET (e.g. --student llama-micro), "
                              "or --resume RUN_DIR")
        if s.mode not in ("logits", "sequence"):
            raise GptlabError(f"mode={s.mode!r} must be 'logits' (match the teacher's distributions) or 'sequence' "
                              "(train on text the teacher generates)")

    def train_config(self, s: DistillSettings, device) -> TrainConfig:
        return train_config_from(s, max_steps=DEFAULT_STEPS if s.max_steps is None else s.max_steps, device=str(device))

    def record(self, s: DistillSettings) -> dict:
        refs = self.refs
        return {k: getattr(s, k) for k in RECORDED} | {k: recorded_ref(getattr(s, k), refs[k]) for k in refs}

    def from_record(self, meta: dict, s: DistillSettings) -> DistillSettings:
        return from_record(DistillSettings, meta, s)

    def build(self, s: DistillSettings, cfg: TrainConfig, dev, resuming, steps_known) -> Job:
        from gptlab.data import load_corpus, split_text
        from gptlab.training.batches import window_batches
        from gptlab.training.loop import LanguageModeling

        if resuming is None:
            s = replace(s, **self.record(s))
        torch.manual_seed(cfg.seed)
        t_model, t_tok = load_model_and_tokenizer(s.teacher, dev)
        s_model, s_tok = _student(s.student, t_tok, dev, s.context_length)
        check_same_tokenizer(t_tok, s_tok)
        if s_model.cfg.vocab_size != t_model.cfg.vocab_size:
            raise GptlabError(f"teacher vocabulary {t_model.cfg.vocab_size} != student vocabulary "
                              f"{s_model.cfg.vocab_size}; they must share one tokenizer")
        L = min(s.context_length, s_model.cfg.context_length, t_model.cfg.context_length)
        train_text, val_text = split_text(load_corpus(s.data), 1.0 - s.val_ratio)
        train_ids = np.asarray(t_tok.encode(train_text, allowed_special="none"), dtype=np.int64)
        val_ids = np.asarray(t_tok.encode(val_text, allowed_special="none"), dtype=np.int64)
        task = DistillationTask(t_model, s.alpha, s.temperature)
        files = {}
        if s.mode == "sequence":
            task = LanguageModeling()
            train_ids = _sequence_data(s, t_model, t_tok, train_ids, cfg.seed, resuming)
            files[TEACHER_TOKENS] = lambda p, ids=train_ids: _save_tokens(p, ids)
        resume_state = restore_checkpoint(s_model, resuming.path) if resuming is not None else None
        stride = s.stride or L
        train_b = window_batches(train_ids, L, stride, cfg.batch_size, seed=cfg.seed)
        val_b = window_batches(val_ids, L, stride, cfg.batch_size, shuffle=False, drop_last=False, what="validation") \
            if len(val_ids) > L else None
        print(f"distilling ({s.mode}) {s.teacher} -> {s.student}: student "
              f"{s_model.cfg.param_counts()['total'] / 1e6:.2f}M parameters, {len(train_ids):,} training tokens, "
              f"alpha {s.alpha}, T {s.temperature}", flush=True)
        return Job(s_model, train_b, val_b, task, t_tok, resume_state=resume_state, files=files)

    def report(self, s: DistillSettings, cfg: TrainConfig, job: Job, result, run: Path):
        if result.best_val_loss is not None:
            print(f"best student val loss {result.best_val_loss:.3f} at step {result.best_step} (saved in {run}/model)")
        return result


distill = api(DistillSettings, lambda s: run_recipe(Distillation(), s), name="distill", positional=("teacher", "student", "data", "out"),
              summary="Distil ``teacher`` into ``student``; returns the :class:`TrainResult` "
              "(see :class:`DistillSettings`).")
distill_command = command(DistillSettings, lambda s: run_recipe(Distillation(), s), name="distill_command")
