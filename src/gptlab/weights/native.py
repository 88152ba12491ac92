"""gptlab's own model directory: ``config.json`` + ``model.safetensors`` + tokenizer files.

This is what training writes (``RUN/model``, ``RUN/checkpoints/step-N``) and
what ``generate`` loads. ``config.json`` holds::

    "format": "gptlab"
    "kind":   "lm" | "classifier"        what the checkpoint is (CheckpointInfo)
    "model":  ModelConfig.to_dict()      with its "family"
    "classifier": {labels, max_length, pad_id, base_model, trainable}   a classifier's ClassifierInfo
    "lora":   {rank, alpha, dropout, targets}   LoraConfig of adapters stored unmerged

The classifier and LoRA entries come from the model's typed attributes
(``LanguageModel.classifier`` / ``.lora``), so every directory written for a
model -- a training checkpoint as much as ``RUN/model`` -- describes it the
same way. A directory written before ``"kind"`` existed is recognised as
before: by its ``"classifier"`` entry or, failing that, by its output head.

This file is the one reader of the format (:func:`read_native`); loading goes
through the one load path, :func:`gptlab.weights.materialize.materialize`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_save, atomic_write_json
from gptlab.models import FAMILIES
from gptlab.models.base import ClassifierInfo, LanguageModel, LoraConfig
from gptlab.models.config import ConfigError, ModelConfig
from gptlab.weights.keymaps import state_rules
from gptlab.weights.materialize import fill, materialize

FORMAT = "gptlab"


def is_native_dir(path: str | Path) -> bool:
    """True for a directory whose config.json was written by gptlab."""
    meta = _read_meta(Path(path))
    return meta is not None and meta.get("format") == FORMAT


KINDS = ("lm", "classifier")


@dataclass
class CheckpointInfo:
    """What a gptlab model directory holds besides its config: its kind, a classifier's labels, LoRA settings."""

    kind: str = "lm"  # "lm" | "classifier"
    classifier: ClassifierInfo | None = None  # None for a classifier checkpoint written without its entry
    lora: LoraConfig | None = None  # adapters stored unmerged in the weights

    @classmethod
    def of_model(cls, model: LanguageModel) -> "CheckpointInfo":
        """The info a directory written for ``model`` records."""
        return cls("classifier" if model.classifier is not None else "lm", model.classifier, model.lora)

    def to_meta(self) -> dict:
        """The config.json entries (besides format and model)."""
        meta: dict = {"kind": self.kind}
        if self.classifier is not None:
            meta["classifier"] = self.classifier.to_dict()
        if self.lora is not None:  # the adapters' keys are in the weights: record how to rebuild them
            meta["lora"] = dataclasses.asdict(self.lora)
        return meta


def save_model_dir(model: nn.Module, out: str | Path, tokenizer=None) -> Path:
    """Write weights (safetensors, tied weights stored once), config and tokenizer atomically.

    ``config.json`` records the model's :class:`CheckpointInfo` (kind, classifier
    labels, LoRA settings of unmerged adapters).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict().items():
        key = t.data_ptr()
        if key in seen and t.numel() > 0:  # a tied weight: stored once
            continue
        seen[key] = name
        state[name] = t.detach().contiguous().cpu()
    atomic_save(out / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    return write_model_config(model, out, tokenizer)


def write_model_config(model: nn.Module, out: str | Path, tokenizer=None) -> Path:
    """Write a model directory's ``config.json`` (and tokenizer files) without its weights: what a sharded
    training checkpoint keeps beside the shards, so it describes its model as a model directory does."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, **CheckpointInfo.of_model(model).to_meta(), "model": model.cfg.to_dict()}
    atomic_write_json(out / "config.json", meta)
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def read_config(path: str | Path) -> ModelConfig:
    """The model config stored in a gptlab model directory, with a clear error if it is broken."""
    p = Path(path) / "config.json"
    try:
        meta = json.loads(p.read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
            raise TypeError("expected a JSON object with a 'model' object")
        return ModelConfig.from_dict(meta["model"])
    except FileNotFoundError:
        raise GptlabError(f"{p} not found; a gptlab model directory needs config.json and model.safetensors") from None
    except ConfigError as e:
        raise GptlabError(f"{p}: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:  # JSONDecodeError is a ValueError
        raise GptlabError(f"{p} is not a valid gptlab config ({type(e).__name__}: {e}); re-export or retrain "
                          "the model") from None


def _read_meta(path: Path) -> dict | None:
    """config.json of a directory as a dict, or None when it is missing or unreadable (the loader says why)."""
    cfgfile = path / "config.json"
    try:
        meta = json.loads(cfgfile.read_text()) if path.is_dir() and cfgfile.is_file() else None
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def read_info(path: str | Path) -> CheckpointInfo:
    """The :class:`CheckpointInfo` of a gptlab directory: its ``"kind"``, or for an older directory,
    a classifier recognised by its ``"classifier"`` entry or its output head."""
    path = Path(path)
    meta = _read_meta(path) or {}
    entry, lora = meta.get("classifier"), meta.get("lora")
    try:
        info = CheckpointInfo(meta.get("kind", "lm"), ClassifierInfo.from_dict(entry) if isinstance(entry, dict)
                              else None, LoraConfig(**lora) if isinstance(lora, dict) else None)
    except TypeError as e:
        raise GptlabError(f"{path / 'config.json'}: its 'lora' entry is not valid ({e})") from None
    if info.kind not in KINDS:
        raise GptlabError(f"{path / 'config.json'} has kind {info.kind!r}; known kinds: {', '.join(KINDS)}")
    if "kind" not in meta and (entry or _classifier_head(path, meta)):
        info.kind = "classifier"
    return info


class NativeTensors:
    """The tensors of ``model.safetensors`` under our own names, for :func:`materialize`."""

    by = "model"

    def __init__(self, path: Path):
        wfile = path / "model.safetensors"
        if not wfile.is_file():
            raise GptlabError(f"{wfile} not found; the model directory is incomplete (was training interrupted "
                              "before the first checkpoint?)")
        try:
            self.state = load_file(str(wfile), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise GptlabError(f"{wfile} is corrupt or truncated ({e}); restore it from another checkpoint") from None
        self.source = str(wfile)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.state.items()}

    def rules(self, model: nn.Module):
        rules, ignore = state_rules(model, self.state)
        return rules, ignore.__contains__

    def get(self, key: str, dtype: torch.dtype | None) -> torch.Tensor:
        t = self.state.pop(key)  # handed over once: the model owns it now
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def read_native(path: str | Path) -> tuple[ModelConfig, CheckpointInfo, NativeTensors]:
    """Read a gptlab directory: its config, its :class:`CheckpointInfo` and its tensors."""
    path = Path(path)
    cfg = read_config(path)
    return cfg, read_info(path), NativeTensors(path)


def load_native(path: str | Path, *, dtype: torch.dtype | None = None, device=None,
                prepare: Callable[[LanguageModel, CheckpointInfo], None] | None = None) -> LanguageModel:
    """Load any gptlab directory (LM or classifier) through the one load path, strictly checked.

    A classifier gets the head its weights have and ``model.classifier`` from
    config.json. ``prepare(model, info)`` may change the empty model further before
    the check (``finetune`` adds the LoRA adapters of ``info.lora`` this way).
    """
    path = Path(path)
    cfg, info, tensors = read_native(path)

    def setup(model: LanguageModel) -> None:
        head = _classifier_head(path, {"model": {"vocab_size": cfg.vocab_size}}) if info.kind == "classifier" else None
        if head is not None:  # a classifier's head: one output per label (and a bias)
            rows, bias = head
            model.set_head(nn.Linear(model.get_head().in_features, rows, bias=bias, device="meta"))
        model.classifier = info.classifier
        if prepare is not None:
            prepare(model, info)

    return materialize(cfg, tensors, dtype, device, prepare=setup)


def load_weights_into(model: nn.Module, path: str | Path) -> nn.Module:
    """Replace ``model``'s weights by those of gptlab directory ``path`` (strictly checked), on its device.

    For resuming: the model was already built, its head replaced and adapters added as
    the run's recipe does; requires_grad flags are kept.
    """
    device = next(model.parameters()).device
    fill(model, NativeTensors(Path(path)), device=device)
    model.tie_weights()
    return model


def classifier_head(path: Path, vocab_size: int | None) -> tuple[int, bool] | None:
    """(rows, has bias) of the output head in ``path/model.safetensors`` when it is not an LM head, else None.

    An LM head has ``vocab_size`` rows and no bias; a head from ``replace_output_head``
    (a classifier) has one row per class and a bias. Only the file's header is read.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            keys = set(f.keys())
            for head in sorted({fam.model.head_key() for fam in FAMILIES.values()}):
                if head in keys:
                    rows = f.get_slice(head).get_shape()[0]
                    bias = head.removesuffix(".weight") + ".bias" in keys
                    if bias or (vocab_size is not None and rows != vocab_size):
                        return rows, bias
    except (SafetensorError, OSError, ValueError):
        pass  # missing or damaged: the loader reports it
    return None


def _classifier_head(path: Path, meta: dict) -> tuple[int, bool] | None:
    """:func:`classifier_head` of a gptlab directory whose config.json is ``meta``."""
    if meta.get("format") not in (FORMAT, None) or not (path / "model.safetensors").is_file():
        return None
    return classifier_head(path, (meta.get("model") or {}).get("vocab_size"))


def refuse_classifier(path: Path, ref: str, why: str = "this command needs one",
                      alternative: str = "") -> None:
    """A directory saved by ``gptlab finetune classify`` holds a classifier, not an LM: say so before loading.

    Recognised by its kind (:func:`read_info`): the ``kind``/``classifier`` entries of
    its config.json, or, for a checkpoint written without them, by its output head.
    """
    meta = _read_meta(path)
    if meta is None or meta.get("format") != FORMAT:
        return  # not a gptlab directory: the loader reports what it is
    info = read_info(path)
    if info.kind != "classifier":
        return
    tail = f"; use it with `gptlab classify {ref} TEXT`" + (f", {alternative}" if alternative else "")
    if info.classifier is not None:
        labels = [str(x) for x in info.classifier.labels]
        shown = ", ".join(labels[:4]) + (", ..." if len(labels) > 4 else "")
        raise GptlabError(f"{ref} is a classifier ({len(labels)} labels: {shown}) made by `gptlab finetune "
                          f"classify`, not a language model, and {why}" + tail)
    vocab = (meta.get("model") or {}).get("vocab_size")
    rows, bias = _classifier_head(path, meta) or (0, False)
    raise GptlabError(f"{ref} is a classifier (its output head has {rows} outputs{' and a bias' if bias else ''}"
                      f", not one per token of the {vocab}-token vocabulary), not a language model, and {why}"
                      + tail)


def load_model_dir(path: str | Path, *, dtype: torch.dtype | None = None, device=None) -> nn.Module:
    """Load a gptlab language-model directory, strictly checked (a classifier is refused with one line)."""
    path = Path(path)
    refuse_classifier(path, str(path))
    return load_native(path, dtype=dtype, device=device)
