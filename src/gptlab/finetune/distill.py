"""Knowledge distillation: a small student learns from a larger teacher (``gptlab distill --mode ...``).

What the student learns from (the kinds of the distillation literature):

- ``logits`` (response-based, word-level; Hinton et al. 2015, https://arxiv.org/abs/1503.02531): the
  teacher's softened next-token distribution as well as the true next token,

      loss = (1 − α) · CE(student, labels) + α · T² · KL(softmax(teacher / T) ‖ softmax(student / T));

- ``features`` (feature-based): the teacher's hidden states at mapped layers, through learned
  projections where the widths differ; ``relations`` (relation-based): the teacher's token-to-token
  similarity structure at mapped layers. Both are terms of the same loss (``finetune/distill_losses.py``);
- ``sequence`` (sequence-level; Kim & Rush 2016, https://arxiv.org/abs/1606.07947): the teacher
  *generates* the corpus, and the student trains on it with the ordinary next-token loss;
- ``blackbox``: the teacher is only an OpenAI-compatible endpoint; its answers to ``--prompts`` become a
  (prompt, answer) dataset, the prompt masked; ``reasoning``: the same with step-by-step traces, the
  trace and the answer kept apart by markers (``finetune/distill_teacher.py``, ``finetune/distill_text.py``).

Terms combine with weights: ``--mode logits+features``, ``--mode logits:0.5,features:0.5``,
``--mode sequence+logits`` (see :func:`gptlab.finetune.distill_losses.parse_modes`). ``logits``,
``features`` and ``relations`` read the student's own tokens, so the tokenizers must be identical;
``sequence``, ``blackbox`` and ``reasoning`` alone work across vocabularies.

A run records its settings in OUT/distill_config.json (and the teacher's text in OUT/teacher_tokens.npy
or OUT/teacher_answers.jsonl; the feature projections in each checkpoint's state.pt), so
``--resume OUT`` continues it exactly from the latest checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_save
from gptlab.finetune.common import load_model_and_tokenizer, restore_checkpoint
from gptlab.finetune.distill_losses import (DATA, FEATURE_LOSSES, DistillationTask, Projections, dense_terms,
                                            kl_term, parse_layer_map, parse_modes)
from gptlab.finetune.distill_teacher import read_prompts
from gptlab.finetune.distill_text import build_student, is_endpoint, text_job, text_report
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
    keep = targets != IGNORE
    kl = kl_term(student_logits, teacher_logits, keep, temperature)
    ce = F.cross_entropy(student_logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                         reduction="sum") / keep.sum().clamp(min=1)
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl, ce, kl


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


@dataclass
class DistillSettings(RunSettings):
    """Knowledge distillation: train a small student on a teacher's predictions, hidden states or text.

    --mode names what the student learns from: logits, features, relations (dense terms: the teacher reads
    the student's tokens, one tokenizer), sequence (the teacher generates the corpus), blackbox (an
    OpenAI-compatible endpoint answers --prompts), reasoning (the teacher's step-by-step traces). Join
    terms with + and weigh them with :W, e.g. logits+features or logits:0.5,features:0.5. The loss is
    (1 - alpha) * CE + alpha * sum of weight * term. OUT/distill_config.json records the settings,
    which --resume reads back.

    Attributes:
        teacher: the teacher: a run/model dir, Hugging Face dir, .gguf file or pkg:PACKAGE/PATH, or for
            blackbox/reasoning an OpenAI-compatible endpoint http://HOST:PORT/v1 (key from $OPENAI_API_KEY).
        student: a pretrained student REF, or a preset name (e.g. llama-micro) built fresh with the teacher's vocabulary.
        data: the text corpus (dense and sequence modes): a file, a directory of .txt files, or a named corpus
            (the-verdict, tinyshakespeare).
        mode: what to distil: logits, features, relations, sequence, blackbox, reasoning, or terms joined by +
            with optional :WEIGHT (logits+features, logits:0.5,features:0.5, sequence+logits).
        alpha: weight of the teacher terms (0 = ordinary training, 1 = teacher only).
        temperature: softening temperature T of both distributions (logits).
        layer_map: features/relations: which teacher layer each student layer matches, 'auto' (student layer
            i <- teacher layer round((i+1)*Lt/Ls)-1) or STUDENT:TEACHER pairs such as 0:2,1:5 (0-based).
        feature_loss: features: mse or cosine distance between projected student and teacher hidden states.
        teacher_model: blackbox/reasoning with an endpoint: the model name the endpoint serves.
        prompts: blackbox/reasoning: a JSONL file of prompts, one {"prompt": ...} a line.
        answers: blackbox/reasoning: where the teacher's answers are kept as a dataset (default OUT.answers.jsonl);
            a run started again fetches only the answers still missing.
        retries: blackbox/reasoning: retries of a rate-limited (429) or failed (5xx, network) request, with back-off.
        tokenizer: the tokenizer of a preset --student (default: the teacher's; needed when the teacher is an
            endpoint), e.g. a model directory.
        context_length: tokens per training window (the longest prompt + answer in blackbox/reasoning).
        stride: distance between window starts (default: the context length, no overlap).
        max_steps: optimizer steps (default 200).
        batch_size: windows per batch.
        lr: peak learning rate (AdamW, warmup + cosine over max_steps).
        weight_decay: AdamW weight decay.
        eval_every: evaluate and checkpoint every N steps.
        eval_iters: batches per evaluation.
        val_ratio: fraction of the corpus (or of the prompts) held out for validation.
        sequences: sequence mode: how many teacher generations.
        gen_tokens: tokens the teacher generates per prompt (sequence, blackbox, reasoning).
        resume: continue the run in this directory from its latest checkpoint, with the settings it was
            started with (only --max-steps, the new total, may change; the schedule follows it).
    """

    POSITIVE = ('sequences', 'gen_tokens', 'context_length', 'temperature')

    teacher: str | None = None
    student: str | None = None
    data: str | None = None
    out: str = "runs/distill"
    mode: str = "logits"
    alpha: float = 0.5
    temperature: float = 2.0
    layer_map: str = "auto"
    feature_loss: str = "mse"
    teacher_model: str | None = None
    prompts: str | None = None
    answers: str | None = None
    retries: int = 5
    tokenizer: str | None = None
    context_length: int = 128
    stride: int | None = None
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_iters: int = 10
    val_ratio: float = 0.1
    sequences: int = 64
    gen_tokens: int = 128


RECORDED = ("teacher", "student", "data", "mode", "alpha", "temperature", "layer_map", "feature_loss",
            "teacher_model", "prompts", "answers", "retries", "tokenizer", "context_length", "stride", "val_ratio",
            "sequences", "gen_tokens")
PROJECTIONS = "feature_projections.safetensors"  # features mode: the trained projections (not in RUN/model)


def _save_tokens(path: Path, ids: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temp name
            np.save(f, ids)

    atomic_save(path, write)


def _sequence_data(s: DistillSettings, t_model, t_tok, s_tok, train_text: str, seed: int, resuming) -> np.ndarray:
    """Sequence mode's training tokens (the student's ids): the teacher's text saved when the run started,
    or a new sample, re-encoded with the student's tokenizer where the two differ."""
    if resuming is not None:  # the text the teacher wrote when the run started, not a new sample
        saved = resuming.path / TEACHER_TOKENS
        if not saved.is_file():
            raise GptlabError(f"{resuming.path} has no {TEACHER_TOKENS} (the teacher's generated text) to resume "
                              "sequence-level distillation from; start a new run with --out")
        return np.load(saved)
    # Prompts: the first tokens of evenly spaced training windows; the teacher writes the rest.
    train_ids = np.asarray(t_tok.encode(train_text, allowed_special="none"), dtype=np.int64)
    starts = np.linspace(0, max(0, len(train_ids) - 16), num=s.sequences).astype(int)
    ids = teacher_corpus(t_model, t_tok, [train_ids[i:i + 8].tolist() for i in starts],
                         min(s.gen_tokens, t_model.cfg.context_length - 8), seed=seed)
    try:
        check_same_tokenizer(t_tok, s_tok)
        return ids
    except GptlabError:  # across vocabularies: the teacher's text, each generation ended by the student's eos
        sep, s_sep = (t_tok.eos_id if t_tok.eos_id is not None else 0), (s_tok.eos_id or 0)
        pieces, out = np.split(ids, np.flatnonzero(ids == sep) + 1), []
        for piece in pieces:
            if len(piece):
                out += s_tok.encode(t_tok.decode(piece[piece != sep].tolist()), allowed_special="none") + [s_sep]
        return np.asarray(out, dtype=np.int64)


class Distillation:
    """The distillation recipe (see the module docstring)."""

    config_file, what, limits = CONFIG_FILE, "distillation", ("max_steps",)

    @property
    def refs(self) -> dict:
        from gptlab.data.corpus import BUILTIN
        from gptlab.data.download import DATASETS
        from gptlab.models.config import list_presets

        return {"teacher": (), "student": tuple(list_presets()), "data": (BUILTIN, *DATASETS), "prompts": (),
                "answers": (), "tokenizer": ()}

    def check(self, s: DistillSettings) -> None:
        if not s.teacher or not s.student:
            raise GptlabError("give --teacher REF and --student REF|PRESET (e.g. --student llama-micro), "
                              "or --resume RUN_DIR")
        modes = parse_modes(s.mode)
        if s.retries < 0:
            raise GptlabError(f"--retries {s.retries} must be >= 0 (0: a failed request is not tried again)")
        if s.tokenizer:
            from gptlab.tokenizers import load_tokenizer

            load_tokenizer(s.tokenizer)  # a bad tokenizer fails before anything is loaded or asked
        if s.feature_loss not in FEATURE_LOSSES:
            raise GptlabError(f"--feature-loss {s.feature_loss} must be one of {', '.join(FEATURE_LOSSES)}")
        data = next((m for m in modes if m in DATA), None)
        if data in ("blackbox", "reasoning"):
            if not s.prompts:
                raise GptlabError(f"--mode {data} needs --prompts FILE.jsonl (one {{\"prompt\": ...}} a line)")
            if data == "blackbox" and not is_endpoint(s.teacher):
                raise GptlabError(f"--mode blackbox needs --teacher http://HOST:PORT/v1 (an OpenAI-compatible "
                                  f"endpoint), not {s.teacher}; for a local teacher use --mode sequence or reasoning")
            if is_endpoint(s.teacher) and not s.teacher_model:
                raise GptlabError("an endpoint teacher needs --teacher-model NAME (the model the endpoint serves)")
            read_prompts(s.prompts)  # a missing or malformed prompts file fails before anything is asked
        else:
            if is_endpoint(s.teacher):
                raise GptlabError(f"--mode {s.mode} needs the teacher's model (its logits or hidden states); an "
                                  "endpoint gives only text: use --mode blackbox or --mode reasoning")
            if not s.data:
                raise GptlabError(f"--mode {s.mode} needs --data (a text file, a directory of .txt files, or a "
                                  "named corpus such as the-verdict)")

    def train_config(self, s: DistillSettings, device) -> TrainConfig:
        return train_config_from(s, max_steps=DEFAULT_STEPS if s.max_steps is None else s.max_steps, device=str(device))

    def record(self, s: DistillSettings) -> dict:
        refs = self.refs
        return {k: getattr(s, k) for k in RECORDED} | {k: recorded_ref(getattr(s, k), refs[k]) for k in refs}

    def from_record(self, meta: dict, s: DistillSettings) -> DistillSettings:
        rec = meta["settings"]
        if isinstance(rec.get("prompts"), int):  # recorded before --prompts named a file: it was the count
            rec["sequences"] = rec.pop("prompts")
        return from_record(DistillSettings, meta, s)

    def build(self, s: DistillSettings, cfg: TrainConfig, dev, resuming, steps_known) -> Job:
        if resuming is None:
            s = replace(s, **self.record(s))
        modes = parse_modes(s.mode)
        data = next((m for m in modes if m in DATA), None)
        if data in ("blackbox", "reasoning"):
            return text_job(s, cfg, dev, resuming, data, steps_known)
        return self._dense_job(s, modes, cfg, dev, resuming)

    def _dense_job(self, s: DistillSettings, modes: dict, cfg: TrainConfig, dev, resuming) -> Job:
        from gptlab.data import load_corpus, split_text
        from gptlab.training.batches import window_batches
        from gptlab.training.loop import LanguageModeling

        torch.manual_seed(cfg.seed)
        t_model, t_tok = load_model_and_tokenizer(s.teacher, dev)
        s_model, s_tok = build_student(s.student, t_tok, dev, s.context_length, s.tokenizer)
        terms = dense_terms(modes)
        if terms:
            check_same_tokenizer(t_tok, s_tok)
            if s_model.cfg.vocab_size != t_model.cfg.vocab_size:
                raise GptlabError(f"teacher vocabulary {t_model.cfg.vocab_size} != student vocabulary "
                                  f"{s_model.cfg.vocab_size}; --mode {s.mode} needs one tokenizer")
        L = min(s.context_length, s_model.cfg.context_length, t_model.cfg.context_length)
        train_text, val_text = split_text(load_corpus(s.data), 1.0 - s.val_ratio)
        train_ids = np.asarray(s_tok.encode(train_text, allowed_special="none"), dtype=np.int64)
        val_ids = np.asarray(s_tok.encode(val_text, allowed_special="none"), dtype=np.int64)
        task, aux, files = LanguageModeling(), None, {}
        if terms:
            task, aux = _dense_task(s, terms, t_model, s_model, dev)
        if "sequence" in modes:
            train_ids = _sequence_data(s, t_model, t_tok, s_tok, train_text, cfg.seed, resuming)
            files[TEACHER_TOKENS] = lambda p, ids=train_ids: _save_tokens(p, ids)
        resume_state = restore_checkpoint(s_model, resuming.path) if resuming is not None else None
        stride = s.stride or L
        train_b = window_batches(train_ids, L, stride, cfg.batch_size, seed=cfg.seed)
        val_b = window_batches(val_ids, L, stride, cfg.batch_size, shuffle=False, drop_last=False, what="validation") \
            if len(val_ids) > L else None
        print(f"distilling ({s.mode}) {s.teacher} -> {s.student}: student "
              f"{s_model.cfg.param_counts()['total'] / 1e6:.2f}M parameters, {len(train_ids):,} training tokens, "
              f"alpha {s.alpha}, T {s.temperature}", flush=True)
        return Job(s_model, train_b, val_b, task, s_tok, resume_state=resume_state, files=files, aux=aux)

    def report(self, s: DistillSettings, cfg: TrainConfig, job: Job, result, run: Path):
        if job.aux is not None and len(job.aux.state_dict()):
            from safetensors.torch import save_file

            tensors = {k: v.detach().contiguous().cpu() for k, v in job.aux.state_dict().items()}
            atomic_save(run / PROJECTIONS, lambda p: save_file(tensors, p))
        if result.best_val_loss is not None:
            print(f"best student val loss {result.best_val_loss:.3f} at step {result.best_step} (saved in {run}/model)")
        if "held_out" in job.extra:
            text_report(s, job, run)
        return result


def _dense_task(s: DistillSettings, terms: dict, t_model, s_model, dev):
    """The DistillationTask of the dense terms, and its projections (the loop's aux) for features."""
    layer_map = projections = None
    if "features" in terms or "relations" in terms:
        layer_map = parse_layer_map(s.layer_map, s_model.cfg.n_layers, t_model.cfg.n_layers)
    if "features" in terms:
        projections = Projections(len(layer_map), s_model.cfg.emb_dim, t_model.cfg.emb_dim).to(dev)
    task = DistillationTask(t_model, s.alpha, s.temperature, terms=terms, layer_map=layer_map,
                            projections=projections, feature_loss=s.feature_loss)
    return task, projections


distill = api(DistillSettings, lambda s: run_recipe(Distillation(), s), name="distill", positional=("teacher", "student", "data", "out"),
              summary="Distil ``teacher`` into ``student``; returns the :class:`TrainResult` "
              "(see :class:`DistillSettings`).")
distill_command = command(DistillSettings, lambda s: run_recipe(Distillation(), s), name="distill_command")
