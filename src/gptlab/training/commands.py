"""``gptlab train``: pretrain a model on a corpus, or resume a run.

The Python API is :func:`run_training` (also ``gptlab.train``); the CLI
function :func:`train` is the same with flags, and exits non-zero on error.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_text
from gptlab.training.batches import IndexedBatches, RandomWindows, window_batches
from gptlab.training.loop import TrainConfig, TrainResult, train_loop

DEFAULT_START = "The"


def _tokenize(tok, text: str) -> np.ndarray:
    ids = tok.encode(text, allowed_special="all")
    dtype = np.uint16 if tok.vocab_size < 65536 else np.uint32
    return np.asarray(ids, dtype=dtype)


def _build_tokenizer(spec: str | None, train_text: str, vocab_size: int, full_text: str):
    from gptlab import tokenizers as T

    if spec is None or spec == "bpe":
        print(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on the training split ...", flush=True)
        return T.train_bpe([train_text], vocab_size=vocab_size)
    if spec == "char":
        return T.CharTokenizer.from_text(full_text)
    return T.load_tokenizer(spec)


def _data(data: str | None, tokenizer_spec: str | None, vocab_size: int, val_ratio: float):
    """(tokenizer, train token array, val token array, random_windows?) for a data spec."""
    from gptlab import data as D

    if data is not None and Path(data).is_dir() and (Path(data) / "meta.json").is_file():
        prepared = D.load_prepared(data)  # memmapped train/val token files from `gptlab prepare`
        tok = prepared.tokenizer() if tokenizer_spec is None else _build_tokenizer(tokenizer_spec, "", vocab_size, "")
        return tok, prepared.train, prepared.val, True
    text = D.load_corpus(data)
    train_text, val_text = D.split_text(text, 1.0 - val_ratio)
    tok = _build_tokenizer(tokenizer_spec, train_text, vocab_size, text)
    return tok, _tokenize(tok, train_text), _tokenize(tok, val_text), False


def run_training(data: str | None = None, *, preset: str = "gpt2-mini", out: str | Path = "runs/default",
                 resume: str | Path | None = None, tokenizer: str | None = None, vocab_size: int = 4096,
                 context_length: int | None = None, n_layers: int | None = None, emb_dim: int | None = None,
                 n_heads: int | None = None, dropout: float | None = None, stride: int | None = None,
                 val_ratio: float = 0.1, start_context: str = DEFAULT_START, sample_tokens: int = 40,
                 overwrite: bool = False, progress: bool = True, train_cfg: TrainConfig | None = None) -> TrainResult:
    """Pretrain (or resume) a model; see :func:`train` for the meaning of each argument."""
    from gptlab.device import pick_device
    from gptlab.generation import generate
    from gptlab.models import build_model, get_preset
    from gptlab.training.checkpoint import latest_checkpoint, load_checkpoint

    tcfg = train_cfg or TrainConfig()
    tcfg.validate_limits()  # a bad limit is refused before a --resume reads anything
    resume_state = None
    if resume is not None:
        run = Path(resume)
        saved_path = run / "train_config.yaml"
        if not saved_path.is_file():
            raise GptlabError(f"{run} is not a gptlab run directory (no train_config.yaml); check the --resume path")
        saved = yaml.safe_load(saved_path.read_text())
        ck = latest_checkpoint(run)
        device = pick_device(tcfg.device)
        model, resume_state = load_checkpoint(ck, device)
        from gptlab.tokenizers import load_tokenizer

        tok = load_tokenizer(ck)
        d = saved["data"]
        _, train_ids, val_ids, random_windows = _data(d["spec"], str(ck), vocab_size, d["val_ratio"])
        # Keep the schedule and data order of the original run; only the stopping limits may change.
        old = TrainConfig(**saved["train"])
        for f in ("max_steps", "epochs", "max_time", "patience"):
            if getattr(tcfg, f) is not None:
                setattr(old, f, getattr(tcfg, f))
        tcfg = old
        stride = d["stride"]
        start_context, sample_tokens = saved.get("start_context", start_context), saved.get("sample_tokens", sample_tokens)
        data, val_ratio = d["spec"], d["val_ratio"]
        print(f"resuming {run} from {ck.name} (step {resume_state['step']})", flush=True)
    else:
        run = Path(out)
        if (run / "checkpoints").exists() or (run / "model").exists():
            if not overwrite:
                raise GptlabError(f"{run} already holds a run; pass --resume {run} to continue it, "
                                  "--out NEW_DIR for a new one, or --overwrite to replace it")
            shutil.rmtree(run)
        tcfg.validate()
        torch.manual_seed(tcfg.seed)
        device = pick_device(tcfg.device)
        from gptlab.device import autocast_dtype

        autocast_dtype(device, tcfg.precision)  # refuse a bad --precision before any work
        if not 0.0 < val_ratio < 1.0:
            raise GptlabError(f"--val-ratio {val_ratio} must be strictly between 0 and 1 (e.g. 0.1)")
        cfg = get_preset(preset)  # an unknown preset fails before the tokenizer is trained
        changes: dict[str, Any] = {}
        for k, v in (("context_length", context_length), ("n_layers", n_layers), ("emb_dim", emb_dim),
                     ("n_heads", n_heads)):
            if v is not None:
                changes[k] = v
        if dropout is not None:
            if hasattr(cfg, "drop_rate"):
                changes["drop_rate"] = dropout
            elif dropout > 0:
                raise GptlabError(f"--dropout: the {cfg.family} family has no dropout; omit the flag")
        cfg = cfg.replace(**changes)  # validates the overrides (e.g. emb_dim divisible by n_heads)
        tok, train_ids, val_ids, random_windows = _data(data, tokenizer, vocab_size, val_ratio)
        cfg = cfg.replace(vocab_size=tok.vocab_size)
        model = build_model(cfg).to(device)
        stride = stride or cfg.context_length

    L = model.cfg.context_length
    if random_windows:
        train_b = RandomWindows(train_ids, L, tcfg.batch_size, seed=tcfg.seed)
        val_b = RandomWindows(val_ids, L, tcfg.batch_size, seed=tcfg.seed + 1, what="validation") if len(val_ids) > L else None
    else:
        train_b = window_batches(train_ids, L, stride, tcfg.batch_size, seed=tcfg.seed)
        val_b = None
        if len(val_ids) > L:
            val_b = window_batches(val_ids, L, L, tcfg.batch_size, shuffle=False, drop_last=False, what="validation")
        else:
            print(f"note: validation split has {len(val_ids)} tokens, fewer than one window of {L + 1}; "
                  "no validation loss will be reported", flush=True)

    if resume_state is None:
        run.mkdir(parents=True, exist_ok=True)
        record = {"data": {"spec": data, "val_ratio": val_ratio, "stride": stride,
                           "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids))},
                  "model": model.cfg.to_dict(), "tokenizer": tokenizer or "bpe (trained on the training split)",
                  "train": dataclasses.asdict(tcfg), "start_context": start_context, "sample_tokens": sample_tokens,
                  "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_text(run / "train_config.yaml", yaml.safe_dump(record, sort_keys=False))
        n = model.cfg.param_counts()
        print(f"model: {model.cfg.family} {n['total'] / 1e6:.2f}M parameters "
              f"(L{model.cfg.n_layers} d{model.cfg.emb_dim} h{model.cfg.n_heads}, context {L}, vocab {model.cfg.vocab_size}); "
              f"data: {len(train_ids):,} train / {len(val_ids):,} val tokens; device {device}", flush=True)

    start_ids = torch.tensor([tok.encode(start_context) or [tok.eos_id or 0]], dtype=torch.long)

    def sample(m: torch.nn.Module) -> str:
        out_ids = generate(m, start_ids, sample_tokens, temperature=0.8, top_k=40, seed=0)
        return tok.decode(out_ids[0].tolist())

    result = train_loop(model, train_b, val_b, tcfg, run, tokenizer=tok, resume_state=resume_state,
                 sample_fn=sample, progress=progress)
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
        return result
    print(f"run directory: {run}  ({', '.join(written)})")
    if (run / "model").exists():
        print(f"try: gptlab generate --model {run} --prompt {json.dumps(start_context)}")
    return result


def train(data: str | None = None, preset: str = "gpt2-mini", out: str = "runs/default",
          resume: str | None = None, tokenizer: str | None = None, vocab_size: int = 4096,
          max_steps: int | None = None, epochs: float | None = None, max_time: float | None = None,
          batch_size: int = 8, grad_accum: int = 1, lr: float = 1e-3, min_lr: float | None = None,
          warmup_steps: int | None = None, weight_decay: float = 0.1, grad_clip: float | None = 1.0,
          context_length: int | None = None, n_layers: int | None = None, emb_dim: int | None = None,
          n_heads: int | None = None, dropout: float | None = None, stride: int | None = None,
          val_ratio: float = 0.1, eval_every: int = 50, eval_iters: int = 10, patience: int | None = None,
          precision: str = "auto", compile: bool = False, device: str = "auto", seed: int = 123,
          start_context: str = DEFAULT_START, overwrite: bool = False, progress: bool = True) -> int:
    """Pretrain a GPT (or any preset) on a corpus and write a run directory.

    With no flags this trains gpt2-mini on the built-in corpus (CPython's
    documentation text; no download) for 300 steps, a few minutes on 2 CPU cores.

    Args:
        data: text file, directory of .txt files, .jsonl with a "text" field, a
            directory made by `gptlab prepare`, or a named corpus (the-verdict,
            tinyshakespeare). Default: the built-in corpus.
        preset: model shape (gptlab presets, e.g. gpt2-mini, gpt2-micro, gpt2-124m, llama-micro).
        out: run directory to create.
        resume: continue the run in this directory from its latest checkpoint (exact).
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
        precision: auto (bf16 where fast), fp32, bf16 or fp16.
        compile: use torch.compile.
        device: auto, cpu, cuda or mps.
        seed: random seed.
        start_context: text the samples start from.
        overwrite: replace an existing run in --out.
        progress: show a progress bar.
    """
    if max_steps is None and epochs is None and max_time is None and resume is None:
        max_steps = 300
    cfg = TrainConfig(max_steps=max_steps, epochs=epochs, max_time=max_time, batch_size=batch_size,
                      grad_accum=grad_accum, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
                      weight_decay=weight_decay, grad_clip=grad_clip or None, precision=precision,
                      compile=compile, eval_every=eval_every, eval_iters=eval_iters, patience=patience,
                      seed=seed, device=device)
    run_training(data, preset=preset, out=out, resume=resume, tokenizer=tokenizer, vocab_size=vocab_size,
                 context_length=context_length, n_layers=n_layers, emb_dim=emb_dim, n_heads=n_heads,
                 dropout=dropout, stride=stride, val_ratio=val_ratio, start_context=start_context,
                 overwrite=overwrite, progress=progress, train_cfg=cfg)
    return 0
