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
            tinyshakespeare). Default: the built-in corpus. Repeat it with weights for a
            mixture: --data book.txt:0.7 --data code/:0.3 (sources drawn by weight).
        stream: read --data (a .jsonl/.parquet/.txt file or directory) document by document,
            tokenizing on the fly, instead of loading it (every 10th document is validation).
        preset: model shape (gptlab presets, e.g. gpt2-mini, gpt2-micro, gpt2-124m, llama-micro).
        tokenizer: gpt2, char, or a tokenizer path; default: train a byte-level BPE on the training split.
        vocab_size: vocabulary size of the trained BPE tokenizer (default: grows with the corpus,
            the power of two nearest characters / 100, from 512 to 32768).
        max_steps: optimizer steps (default 300 when no other limit is given).
        epochs: train for this many passes over the training windows instead.
        max_time: stop after this many seconds.
        batch_size: sequences per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate (AdamW).
        min_lr: floor of the cosine decay (default lr/10).
        warmup_steps: linear warmup steps (default 5% of max_steps).
        weight_decay: AdamW weight decay on 2-D weights.
        beta1: AdamW's first-moment decay, in [0, 1) (0.7 trains nanoGPT's Shakespeare model faster,
            see docs/training-speed.md).
        beta2: AdamW's second-moment decay, in [0, 1).
        grad_clip: clip the gradient norm to this (0 or None disables).
        context_length: override the preset's context length.
        n_layers: override the preset's number of layers.
        emb_dim: override the preset's embedding width.
        n_heads: override the preset's number of heads.
        mlp_act: override the preset's MLP activation (GPT-2: gelu_tanh, its own, or gelu, the exact
            erf GELU nanoGPT uses, 2.7x faster forward + backward on an AVX2 CPU; Llama: silu or
            gelu_tanh).
        dropout: dropout rate (GPT-2 family; default: the preset's, 0.1 for the small gpt2 presets).
        stride: distance between training windows (default: the context length).
        val_ratio: fraction of the text held out for validation.
        eval_every: evaluate, sample and checkpoint every N steps.
        eval_iters: batches per evaluation.
        patience: stop after N evaluations without validation improvement.
        target_loss: stop at the first evaluation (every --eval-every steps) whose validation loss is at or
            below this; needs validation data. A resumed run that already reached it is refused: give a lower one.
            The run's other limits (--max-steps, ...) still apply.
        compile: use torch.compile.
        start_context: text the samples start from.
        resume: continue the run in this directory from its latest checkpoint (exact); only
            --max-steps, --epochs, --max-time, --patience and --target-loss may change.
    """

    data: list[str] | None = None
    stream: bool = False
    preset: str = "gpt2-mini"
    tokenizer: str | None = None
    vocab_size: int | None = None
    max_steps: int | None = None
    epochs: float | None = None
    max_time: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = 1.0
    context_length: int | None = None
    n_layers: int | None = None
    emb_dim: int | None = None
    n_heads: int | None = None
    mlp_act: str | None = None
    dropout: float | None = None
    stride: int | None = None
    val_ratio: float = 0.1
    eval_every: int = 50
    eval_iters: int = 10
    patience: int | None = None
    target_loss: float | None = None
    compile: bool = False
    start_context: str = DEFAULT_START

    def __post_init__(self):
        from gptlab.data.mixture import is_mixture

        if isinstance(self.data, (list, tuple)) and not is_mixture(list(self.data)):
            self.data = self.data[0] if self.data else None  # one source: the plain corpus spec, as recorded


# Recorded under "settings" (the rest of the run is in "train", "data" and "model").
RECORDED = ("data", "stream", "preset", "tokenizer", "vocab_size", "context_length", "n_layers", "emb_dim", "n_heads",
            "mlp_act", "dropout", "stride", "val_ratio", "start_context")


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


@dataclass
class Corpus:
    """What a run trains on: the tokenizer and the token arrays (one source, a mixture, or a stream)."""

    tok: Any
    train: Any  # token array (one source), list of arrays (mixture), or a corpus spec (stream)
    val: Any
    random_windows: bool = False
    names: list | None = None  # mixture: source names, weights
    weights: list | None = None
    chars: int | None = None  # training characters, when known (for the corpus-size advice)
    val_ratio: float = 0.1  # a stream: the share of documents held out

    def n_tokens(self) -> tuple[int, int]:
        if self.names is not None:
            return sum(len(t) for t in self.train), sum(len(v) for v in self.val)
        if isinstance(self.train, str):
            return 0, 0  # a stream: not known before it is read
        return int(len(self.train)), int(len(self.val))


def _data(s: PretrainSettings, tokenizer_spec: str | None) -> Corpus:
    """The run's :class:`Corpus` for its --data (``tokenizer_spec``: the checkpoint's when resuming)."""
    from gptlab import data as D
    from gptlab.data.mixture import is_mixture
    from gptlab.training import pretrain_data as P

    data, vocab_size, val_ratio = s.data, s.vocab_size, s.val_ratio
    if is_mixture(data):
        tok, names, weights, train, val, chars = P.mixture_sources(data, tokenizer_spec, vocab_size, val_ratio,
                                                                   _build_tokenizer)
        return Corpus(tok, train, val, names=names, weights=weights, chars=chars)
    if s.stream:
        if data is None:
            raise GptlabError("--stream reads --data document by document: give --data FILE_OR_DIR")
        if tokenizer_spec is None or tokenizer_spec == "bpe":
            sample = P.stream_sample(data, 5_000_000)
            tok = _build_tokenizer(tokenizer_spec, sample, vocab_size or P.default_vocab(len(sample)), sample)
        else:
            tok = _build_tokenizer(tokenizer_spec, "", vocab_size or 0, "")
        return Corpus(tok, str(data), str(data), val_ratio=val_ratio)
    if data is not None and D.is_prepared(data):
        prepared = D.load_prepared(data)  # memmapped (sharded) train/val token files from `gptlab prepare`
        tok = prepared.tokenizer() if tokenizer_spec is None else _build_tokenizer(tokenizer_spec, "", vocab_size, "")
        return Corpus(tok, prepared.train, prepared.val, random_windows=True)
    text = D.load_corpus(data)
    train_text, val_text = D.split_text(text, 1.0 - val_ratio)
    tok = _build_tokenizer(tokenizer_spec, train_text, vocab_size or P.default_vocab(len(train_text)), text)
    return Corpus(tok, _tokenize(tok, train_text), _tokenize(tok, val_text), chars=len(train_text))


def _model_config(s: PretrainSettings):
    """The preset with the command's overrides (an unknown preset fails before the tokenizer is trained)."""
    from gptlab.models import get_preset

    cfg = get_preset(s.preset)
    changes: dict[str, Any] = {k: getattr(s, k) for k in ("context_length", "n_layers", "emb_dim", "n_heads",
                                                          "mlp_act") if getattr(s, k) is not None}
    if s.dropout is not None:
        if hasattr(cfg, "drop_rate"):
            changes["drop_rate"] = s.dropout
        elif s.dropout > 0:
            raise GptlabError(f"--dropout: the {cfg.family} family has no dropout; omit the flag")
    return cfg.replace(**changes)  # validates the overrides (e.g. emb_dim divisible by n_heads)


def _batches(corpus: Corpus, L: int, stride: int, cfg: TrainConfig):
    """(train, val or None) batch sources: a mixture or a stream as such; random windows of a prepared
    corpus; else windows ``stride`` apart."""
    from gptlab.training import pretrain_data as P

    if corpus.names is not None:
        return P.mixture_batches(corpus.names, corpus.weights, corpus.train, corpus.val, L, cfg.batch_size, cfg.seed)
    if isinstance(corpus.train, str):
        return P.stream_batches(corpus.train, corpus.tok, L, cfg.batch_size, corpus.val_ratio)
    train_ids, val_ids = corpus.train, corpus.val
    if corpus.random_windows:
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
    limits = ("max_steps", "epochs", "max_time", "patience", "target_loss")
    refs = {"data": ("the-verdict", "tinyshakespeare")}

    def __init__(self, train_cfg: TrainConfig | None = None):
        self.train_cfg = train_cfg  # the Python API's full TrainConfig, instead of the settings' fields

    def check(self, s: PretrainSettings) -> None:
        from gptlab.data.mixture import is_mixture

        if not 0.0 < s.val_ratio < 1.0:
            raise GptlabError(f"--val-ratio {s.val_ratio} must be strictly between 0 and 1 (e.g. 0.1)")
        if s.stream and is_mixture(s.data):
            raise GptlabError("--stream reads one --data source; a mixture (several --data, or PATH:WEIGHT) is "
                              "drawn from token arrays: drop --stream, or `gptlab prepare` each source first")

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
            corpus = _data(s, str(ck))
            print(f"resuming {resuming.path} from {ck.name} (step {resume_state['step']})", flush=True)
        else:
            torch.manual_seed(cfg.seed)
            mcfg = _model_config(s)
            corpus = _data(s, s.tokenizer)
            model = build_model(mcfg.replace(vocab_size=corpus.tok.vocab_size)).to(device)
            s.stride = s.stride or mcfg.context_length
        L = model.cfg.context_length
        train_b, val_b = _batches(corpus, L, s.stride or L, cfg)
        _restore_data_position(train_b, resume_state)
        steps_known(cfg.steps_per_epoch(len(train_b)))
        n_train, n_val = corpus.n_tokens()
        record = {"data": {"spec": recorded_ref(s.data, self.refs["data"]), "val_ratio": s.val_ratio, "stride": s.stride,
                           "train_tokens": n_train, "val_tokens": n_val},
                  "model": model.cfg.to_dict(), "tokenizer": s.tokenizer or "bpe (trained on the training split)",
                  "start_context": s.start_context, "sample_tokens": SAMPLE_TOKENS,
                  "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        if resuming is None:
            _announce(model, s.preset, corpus, device)
        return Job(model, train_b, val_b, None, corpus.tok, steps_per_epoch=cfg.steps_per_epoch(len(train_b)),
                   sample_fn=_sampler(corpus.tok, s.start_context), resume_state=resume_state, record=record)

    def report(self, s: PretrainSettings, cfg: TrainConfig, job: Job, result: TrainResult, run: Path) -> TrainResult:
        _print_report(result, run, s.start_context)
        if cfg.target_loss is not None and result.stopped_because != "target_loss" and result.step > 0:
            best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "none"
            print(f"target loss {cfg.target_loss:g} not reached (best val loss {best}); continue with --resume {run} "
                  "and a larger --max-steps/--epochs", flush=True)
        return result


def _restore_data_position(train_b, resume_state: dict | None) -> None:
    """A mixture checks the checkpoint's record of it; a stream continues at the saved position."""
    saved = (resume_state or {}).get("data")
    if not saved:
        return
    if saved.get("kind") == "stream" and hasattr(train_b, "load_state_dict"):
        train_b.load_state_dict(saved, saved["micro_step"])
    elif hasattr(train_b, "check_state"):
        train_b.check_state(saved)


def _announce(model, preset: str, corpus: Corpus, device) -> None:
    """The model and data line, and the one-line warning when the corpus is far too small for the model."""
    from gptlab.training.pretrain_data import corpus_advice

    c = model.cfg
    n = c.param_counts()["total"]
    n_train, n_val = corpus.n_tokens()
    data = (f"{n_train:,} train / {n_val:,} val tokens" if n_train else f"streamed from {corpus.train}")
    if corpus.names is not None:
        data += " from " + ", ".join(f"{name} ({w:.0%})" for name, w in zip(corpus.names, corpus.weights))
    print(f"model: {c.family} {n / 1e6:.2f}M parameters (L{c.n_layers} d{c.emb_dim} h{c.n_heads}, context "
          f"{c.context_length}, vocab {c.vocab_size}); data: {data}; device {device}", flush=True)
    advice = corpus_advice(n_train, n, preset, c.vocab_size, corpus.chars) if n_train else None
    if advice:
        print(advice, flush=True)


def _sampler(tok, start_context: str):
    from gptlab.inference.generation import generate

    start_ids = torch.tensor([tok.encode(start_context) or [tok.eos_id or 0]], dtype=torch.long)

    def sample(m: torch.nn.Module) -> str:  # (within the context: a small one is not warned about every eval)
        new = max(1, min(SAMPLE_TOKENS, m.cfg.context_length - start_ids.shape[1]))
        out_ids = generate(m, start_ids, new, temperature=0.8, top_k=40, seed=0)
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


def _run(s: PretrainSettings, train_cfg: TrainConfig | None = None) -> TrainResult | int | None:
    if train_cfg is not None and s.nproc > 1:
        raise GptlabError("train_cfg= cannot be passed to the processes --nproc starts; give its fields "
                          "(lr=, batch_size=, ...) as keywords instead")
    return run_recipe(Pretraining(train_cfg), s)


def _command(s: PretrainSettings) -> int:
    result = _run(s)
    if result is None or isinstance(result, int):  # a rank other than 0; or the launcher: the exit status
        return result or 0
    return INTERRUPTED if result.stopped_because == "interrupted" else 0


run_training = api(PretrainSettings, _run, name="run_training", positional=("data",), returns=TrainResult,
                   summary="Pretrain (or resume) a model; returns the TrainResult. ``train_cfg=TrainConfig(...)`` "
                           "replaces the training fields (lr, batch_size, limits, ...) as a whole.")
train = command(PretrainSettings, _command, name="train")
