"""Distillation from a teacher's text alone (``--mode blackbox`` / ``--mode reasoning``): the student, the
(prompt, answer) dataset with the prompt masked, and the agreement of the distilled student with its teacher.

    prompts.jsonl --teacher (endpoint or local model)--> answers.jsonl (resumable; RUN/teacher_answers.jsonl)
    -> split: the last val_ratio of the prompts held out -> prompt + answer tokens, prompt masked
    -> train_loop (next-token loss on the answer only) -> the best student answers the held-out prompts
    -> agreement: its final answers against the teacher's (RUN/agreement.json)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_json, atomic_write_text
from gptlab.finetune.distill_teacher import (EndpointTeacher, LocalTeacher, read_answers, agreement, fetch_answers,
                                             read_prompts, training_output)
from gptlab.training.driver import Job

ANSWERS = "teacher_answers.jsonl"  # the run's copy of the teacher's answers (what --resume trains on)
AGREEMENT = "agreement.json"


def is_endpoint(ref: str | None) -> bool:
    """Whether a teacher reference is an HTTP endpoint rather than a model."""
    return str(ref or "").startswith(("http://", "https://"))


def build_student(student: str, tok, device, context_length: int | None, tokenizer: str | None = None):
    """A pretrained student REF, or a preset name built fresh with ``tok``'s vocabulary (or ``tokenizer``'s)."""
    from gptlab.finetune.common import load_model_and_tokenizer
    from gptlab.models import build_model, get_preset
    from gptlab.models.config import ConfigError

    try:
        cfg = get_preset(student)
    except (ConfigError, KeyError, GptlabError):
        cfg = None
    if cfg is None:
        return load_model_and_tokenizer(student, device)
    if tokenizer:
        from gptlab.tokenizers import load_tokenizer

        tok = load_tokenizer(tokenizer)
    if tok is None:
        raise GptlabError(f"--student {student} is a preset, built fresh: give its tokenizer with --tokenizer SPEC "
                          "(e.g. the teacher's model directory), or a pretrained --student REF")
    changes = {"vocab_size": tok.vocab_size} | ({"context_length": context_length} if context_length else {})
    return build_model(cfg.replace(**changes)).to(device), tok


def answers_path(s) -> Path:
    """Where the answers dataset is kept: ``--answers``, else ``OUT.answers.jsonl`` beside the run."""
    return Path(s.answers) if s.answers else Path(str(Path(s.out)) + ".answers.jsonl")


def _teacher(s, dev, seed: int):
    if is_endpoint(s.teacher):
        return EndpointTeacher(s.teacher, s.teacher_model, max_tokens=s.gen_tokens, retries=s.retries, seed=seed)
    from gptlab.finetune.common import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(s.teacher, dev)
    return LocalTeacher(model.eval(), tok, name=str(s.teacher), max_tokens=s.gen_tokens)


def _encode(tok, records: list[dict], limit: int, style: str, what: str) -> list[tuple[list[int], int]]:
    from gptlab.finetune.instruct import encode_example

    enc = [encode_example(tok, {"instruction": r["prompt"], "input": "", "output": training_output(r)}, style)
           for r in records]
    kept = [e for e in enc if e[1] < limit]  # a prompt that fills the window leaves no answer to learn
    if len(kept) < len(enc):
        print(f"note: {len(enc) - len(kept)} {what} prompts dropped: the prompt alone reaches {limit} tokens "
              "(raise --context-length)", flush=True)
    return kept


def text_job(s, cfg, dev, resuming, kind: str, steps_known) -> Job:
    """The Job of ``blackbox`` / ``reasoning`` distillation (see the module docstring)."""
    from gptlab.finetune.common import pad_id_of, restore_checkpoint
    from gptlab.finetune.instruct import InstructionTask, instruction_batches

    torch.manual_seed(cfg.seed)
    tokenizer = s.tokenizer or (None if is_endpoint(s.teacher) else s.teacher)  # a local teacher lends its own
    model, tok = build_student(s.student, None, dev, s.context_length, tokenizer)  # a bad student fails first
    if resuming is not None:  # the answers the run trained on: nothing is asked again
        records = read_answers(resuming.path / ANSWERS)
        if not records:
            raise GptlabError(f"{resuming.path} has no {ANSWERS} to resume {kind} distillation from; start a new "
                              "run with --out")
        stats = None
    else:
        teacher = _teacher(s, dev, cfg.seed)
        records = fetch_answers(teacher, read_prompts(s.prompts), answers_path(s), kind)
        stats = getattr(teacher, "stats", None)
        if stats is not None:
            print(f"teacher {teacher.name}: {stats.line()}", flush=True)
    style = "chat" if getattr(tok, "chat_template", None) else "alpaca"
    n_val = int(len(records) * s.val_ratio)
    train, val = records[:len(records) - n_val], records[len(records) - n_val:]
    limit = min(s.context_length, model.cfg.context_length)
    enc_train, enc_val = _encode(tok, train, limit, style, "training"), _encode(tok, val, limit, style, "validation")
    if len(enc_train) < cfg.batch_size:
        raise GptlabError(f"{len(enc_train)} training answers, fewer than --batch-size {cfg.batch_size}; give more "
                          "prompts or a smaller --batch-size")
    pad = pad_id_of(tok)
    kw = dict(pad_id=pad, eos_id=tok.eos_id if tok.eos_id is not None else pad, allowed_max_length=limit,
              mask_prompt=True)
    train_b = instruction_batches(enc_train, cfg.batch_size, shuffle=True, drop_last=True, seed=cfg.seed, **kw)
    val_b = instruction_batches(enc_val, cfg.batch_size, shuffle=False, drop_last=False, **kw) if enc_val else None
    steps_known(cfg.steps_per_epoch(len(train_b)))
    resume_state = restore_checkpoint(model, resuming.path) if resuming is not None else None
    print(f"distilling ({kind}) {s.teacher} -> {s.student}: {len(train)} training / {len(val)} held-out answers, "
          f"style {style}, prompt masked", flush=True)
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return Job(model, train_b, val_b, InstructionTask(), tok, steps_per_epoch=cfg.steps_per_epoch(len(train_b)),
               resume_state=resume_state, files={ANSWERS: lambda p: atomic_write_text(p, body)},
               extra={"held_out": val, "kind": kind, "stats": stats})


def text_report(s, job: Job, run: Path) -> dict | None:
    """The best student's agreement with the teacher on the held-out prompts (RUN/agreement.json)."""
    from gptlab.weights import load_model

    held_out = job.extra["held_out"]
    if not held_out or not (run / "model" / "config.json").is_file():
        return None
    best = load_model(run / "model", device=next(job.model.parameters()).device).eval()
    result = agreement(LocalTeacher(best, job.tokenizer, "student", max_tokens=s.gen_tokens), held_out)
    stats = job.extra.get("stats")
    result["teacher_requests"] = vars(stats) if stats is not None else None
    atomic_write_json(run / AGREEMENT, result)
    print(f"agreement with the teacher's final answers on {result['n']} held-out prompts: "
          f"{result['matches']}/{result['n']} ({100 * result['agreement']:.1f}%), in {run / AGREEMENT}", flush=True)
    return result
