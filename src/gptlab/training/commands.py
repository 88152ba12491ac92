"""``gptlab train``: pretrain a model on a corpus, or resume a run.

:class:`PretrainSettings` is the recipe's settings (its docstring is ``gptlab train --help``);
:func:`run_training` (also ``gptlab.train``) is the Python API and :func:`train` the CLI command,
both made from it, so the defaults are one set. :class:`Pretraining` is the recipe that
:func:`gptlab.training.driver.run_recipe` runs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.training.batches import RandomWindows, window_batches
from gptlab.training.driver import Job, run_recipe
from gptlab.training.loop import TrainConfig, TrainResult
from gptlab.training.settings import RunSettings, api, command, from_record, recorded_ref, train_config_from

DEFAULT_START = "The"
DEFAULT_STEPS = 300  # when no other limit is given
SAMPLE_TOKENS = 40
INTERRUPTED = 130  # the exit status of a run stopped by Ctrl-C (after its checkpoint is saved)


@dataclass
class PretrainSettings(RunSettings):
    """Pretrain a GPT (or any preset) on a corpus and write a run directory.

    With no flags this trains gpt2-mini on the built-in corpus (CPython's
    documentation text; no download) for 300 steps, a few minutes on 2 CPU cores.

    Attributes:
        data: text file, directory of .txt files, .jsonl with a "text" field, a
            directory made by `gptlab prepare`, or a named corpus (the-verdict,
            tinyshakespeare). Default: the built-in corpus.
        preset: model shape (gptlab presets, e.g. gpt2-mini, gpt2-micro, gpt2-124m, llama-micro).
        tokenizer: gpt2, char, or a tokenizer path; default: train a byte-level BPE on the training split.
        vocab_size: vocabulary size of the trained BPE tokenizer.
        max_steps: optimizer steps (default 300 when no other limit is given).
        epochs: train for this many passes over the training windows instead.
        max_time: stop after this many seconds.
        batch_size: sequences per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate (AdamW).
        min_lr: floor of the cosine decay (default lr/10).
        warmup_steps: linear warmup steps (default 5% of max_steps).
        weight_decay: AdamW weight decay on 2-D weights.
        grad_clip: clip the gradient norm to this (0 or None disables).
        context_length: override the preset's context length.
        n_layers: override the preset's number of layers.
        emb_dim: override the preset's embedding width.
        n_heads: override the preset's number of heads.
        dropout: dropout rate (GPT-2 family; default: the preset's, 0.1 for the small gpt2 presets).
        stride: distance between training windows (default: the context length).
        val_ratio: fraction of the text held out for validation.
        eval_every: evaluate, sample and checkpoint every N steps.
        eval_iters: batches per evaluation.
        patience: stop after N evaluations without validation improvement.
        compile: use torch.compile.
        start_context: text the samples start from.
        resume: continue the run in this directory from its latest checkpoint (exact); only
            --max-steps, --epochs, --max-time and --patience may change.
    """

    data: str | None = None
    preset: str = "gpt2-mini"
    tokenizer: str | None = None
    vocab_size: int = 4096
    max_steps: int | None = None
    epochs: float | None = None
    max_time: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    context_length: int | None = None
    n_layers: int | None = None
    emb_dim: int | None = None
    n_heads: int | None = None
    dropout: float | None = None
    stride: int | None = None
    val_ratio: float = 0.1
    eval_every: int = 50
    eval_iters: int = 10
    patience: int | None = None
    compile: bool = False
    start_context: str = DEFAULT_START


# Recorded under "settings" (the rest of the run is in "train", "data" and "model").
RECORDED = ("data", "preset", "tokenizer", "vocab_size", "context_length", "n_layers", "emb_dim", "n_heads",
            "dropout", "stride", "val_ratio", "start_context")


def _tokenize(tok, text: str) -> np.ndarray:
    ids = tok.encode(text, allowed_special="all")
    dtype = np.uint16 if tok.vocab_size < 65536 else np.uint32
    return np.asarray(ids, dtype=dtype)


def _build_tokenizer(spec: str | None, train_text: str, vocab_size: int, full_text: str):
    from gptlab import tokenizers as T

    if spec is None or spec == "bpe":
        print(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on the training split ...", flush=True)
        from gptlab.tokenizers.bpe import shortfall_note

        tok = T.train_bpe([train_text], vocab_size=vocab_size)
        note = shortfall_note(tok, vocab_size)
        if note:
            print(note, flush=True)
        return tok
    if spec == "char":
        return T.CharTokenizer.from_text(full_text)
    return T.load_tokenizer(spec)


def _data(data: str | None, tokenizer_spec: str | None, vocab_size: int, val_ratio: float):
    """(tokenizer, train token array, val token array, random_windows?) for a data spec."""
    from gptlab import data as D

    if data is not None and D.is_prepared(data):
        prepared = D.load_prepared(data)  # memmapped (sharded) train/val token files from `gptlab prepare`
        tok = prepared.tokenizer() if tokenizer_spec is None else _build_tokenizer(tokenizer_spec, "", vocab_size, "")
        return tok, prepared.train, prepared.val, True
    text = D.load_corpus(data)
    train_text, val_text = D.split_text(text, 1.0 - val_ratio)
    tok = _build_tokenizer(tokenizer_spec, train_text, vocab_size, text)
    return tok, _tokenize(tok, train_text), _tokenize(tok, val_text), False


def _model_config(s: PretrainSettings):
    """The preset with the command's overrides (an unknown preset fails before the tokenizer is trained)."""
    from gptlab.models import get_preset

    cfg = get_preset(s.preset)
    changes: dict[str, Any] = {k: getattr(s, k) for k in ("context_length", "n_layers", "emb_dim", "n_heads")
                               if getattr(s, k) is not None}
    if s.dropout is not None:
        if hasattr(cfg, "drop_rate"):
            changes["drop_rate"] = s.dropout
        elif s.dropout > 0:
            raise GptlabError(f"--dropout: the {cfg.family} family has no dropout; omit the flag")
    return cfg.replace(**changes)  # validates the overrides (e.g. emb_dim divisible by n_heads)


def _batches(train_ids, val_ids, L: int, stride: int, cfg: TrainConfig, random_windows: bool):
    """(train, val or None) batch sources over token arrays: random windows of a prepared corpus, else
    windows ``stride`` apart."""
    if random_windows:
        val = RandomWindows(val_ids, L, cfg.batch_size, seed=cfg.seed + 1, what="validation") if len(val_ids) > L else None
        return RandomWindows(train_ids, L, cfg.batch_size, seed=cfg.seed), val
    train = window_batches(train_ids, L, stride, cfg.batch_size, seed=cfg.seed)
    if len(val_ids) > L:
        return train, window_batches(val_ids, L, L, cfg.batch_size, shuffle=False, drop_last=False, what="validation")
    print(f"note: validation split has {len(val_ids)} tokens, fewer than one window of {L + 1}; "
          "no validation loss will be reported", flush=True)
    return train, None


class Pretraining:
    """The pretraining recipe: next-token loss on windows of a tokenized corpus."""

    config_file = "train_config.yaml"
    what = "gptlab train"  # "... is not a gptlab train run (no train_config.yaml)"
    limits = ("max_steps", "epochs", "max_time", "patience")
    refs = {"data": ("the-verdict", "tinyshakespeare")}

    def __init__(self, train_cfg: TrainConfig | None = None):
        self.train_cfg = train_cfg  # the Python API's full TrainConfig, instead of the settings' fields

    def check(self, s: PretrainSettings) -> None:
        if not 0.0 < s.val_ratio < 1.0:
            raise GptlabError(f"--val-ratio {s.val_ratio} must be strictly between 0 and 1 (e.g. 0.1)")

    def train_config(self, s: PretrainSettings, device) -> TrainConfig:
        from gptlab.device import autocast_dtype

        if self.train_cfg is not None:
            cfg = self.train_cfg
        else:
            no_limit = s.max_steps is None and s.epochs is None and s.max_time is None
            cfg = train_config_from(s, max_steps=DEFAULT_STEPS if no_limit else s.max_steps,
                                    grad_clip=s.grad_clip or None)
        autocast_dtype(device, cfg.precision)  # refuse a bad --precision before any work
        return cfg

    def record(self, s: PretrainSettings) -> dict:
        return {k: getattr(s, k) for k in RECORDED} | {"data": recorded_ref(s.data, self.refs["data"])}

    def from_record(self, meta: dict, s: PretrainSettings) -> PretrainSettings:
        if "settings" not in meta:  # a run recorded before settings were: its data spec and sampling
            d = meta.get("data") or {}
            meta["settings"] = {"data": d.get("spec"), "val_ratio": d.get("val_ratio", 0.1),
                                "stride": d.get("stride"), "start_context": meta.get("start_context", DEFAULT_START)}
        return from_record(PretrainSettings, meta, s)

    def build(self, s: PretrainSettings, cfg: TrainConfig, device, resuming, steps_known) -> Job:
        from gptlab.models import build_model

        resume_state = None
        if resuming is not None:
            from gptlab.training.checkpoint import load_checkpoint

            ck = resuming.latest_checkpoint()
            model, resume_state = load_checkpoint(ck, device)
            tok, train_ids, val_ids, random_windows = _data(s.data, str(ck), s.vocab_size, s.val_ratio)
            print(f"resuming {resuming.path} from {ck.name} (step {resume_state['step']})", flush=True)
        else:
            torch.manual_seed(cfg.seed)
            mcfg = _model_config(s)
            tok, train_ids, val_ids, random_windows = _data(s.data, s.tokenizer, s.vocab_size, s.val_ratio)
            model = build_model(mcfg.replace(vocab_size=tok.vocab_size)).to(device)
            s.stride = s.stride or mcfg.context_length
        L = model.cfg.context_length
        train_b, val_b = _batches(train_ids, val_ids, L, s.stride or L, cfg, random_windows)
        steps_known(cfg.steps_per_epoch(len(train_b)))
        record = {"data": {"spec": recorded_ref(s.data, self.refs["data"]), "val_ratio": s.val_ratio, "stride": s.stride,
                           "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids))},
                  "model": model.cfg.to_dict(), "tokenizer": s.tokenizer or "bpe (trained on the training split)",
                  "start_context": s.start_context, "sample_tokens": SAMPLE_TOKENS,
                  "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        if resuming is None:
            n = model.cfg.param_counts()
            print(f"model: {model.cfg.family} {n['total'] / 1e6:.2f}M parameters (L{model.cfg.n_layers} "
                  f"d{model.cfg.emb_dim} h{model.cfg.n_heads}, context {L}, vocab {model.cfg.vocab_size}); "
                  f"data: {len(train_ids):,} train / {len(val_ids):,} val tokens; device {device}", flush=True)
        return Job(model, train_b, val_b, None, tok, steps_per_epoch=cfg.steps_per_epoch(len(train_b)),
                   sample_fn=_sampler(tok, s.start_context), resume_state=resume_state, record=record)

    def report(self, s: PretrainSettings, cfg: TrainConfig, job: Job, result: TrainResult, run: Path) -> TrainResult:
        _print_report(result, run, s.start_context)
        return result


def _sampler(tok, start_context: str):
    from gptlab.inference.generation import generate

    start_ids = torch.tensor([tok.encode(start_context) or [tok.eos_id or 0]], dtype=torch.long)

    def sample(m: torch.nn.Module) -> str:
        out_ids = generate(m, start_ids, SAMPLE_TOKENS, temperature=0.8, top_k=40, seed=0)
        return tok.decode(out_ids[0].tolist())

    return sample


def _print_report(result: TrainResult, run: Path, start_context: str) -> None:
    d = result.diagnosis
    print(f"\nstopped ({result.stopped_because}) at step {result.step}, {result.tokens:,} tokens seen")
    if result.best_val_loss is not None:
        print(f"best val loss {result.best_val_loss:.3f} at step {result.best_step} (saved as {run / 'model'})")
    if d is not None:
        print(f"diagnosis: {d.message}")
    written = [n for n in ("metrics.jsonl", "loss.png", "samples.txt", "model/", "checkpoints/") if (run / n).exists()]
    if not written:  # e.g. --max-time ran out before the first step
        print(f"run directory: {run}  (nothing trained, so no metrics, samples or model were written; "
              "give a longer --max-time or --max-steps)")
        return
    print(f"run directory: {run}  ({', '.join(written)})")
    if (run / "model").exists():
        print(f"try: gptlab generate --model {run} --prompt {json.dumps(start_context)}")


def _run(s: PretrainSettings, train_cfg: TrainConfig | None = None) -> TrainResult:
    return run_recipe(Pretraining(train_cfg), s)


def _command(s: PretrainSettings) -> int:
    result = _run(s)
    return INTERRUPTED if result.stopped_because == "interrupted" else 0


run_training = api(PretrainSettings, _run, name="run_training", positional=("data",), returns=TrainResult,
                   summary="Pretrain (or resume) a model; returns the TrainResult. ``train_cfg=TrainConfig(...)`` "
                           "replaces the training fields (lr, batch_size, limits, ...) as a whole.")
train = command(PretrainSettings, _command, name="train")
