"""gptlab's own model directory: ``config.json`` + ``model.safetensors`` + tokenizer files.

This is what training writes (``RUN/model``) and what ``generate`` loads.
``config.json`` holds ``ModelConfig.to_dict()`` (with its ``family``) under the
key ``"model"``, plus ``"format": "gptlab"``. A model may carry more entries in
its ``config_extra`` attribute (a classifier's ``"classifier"``: labels,
max_length, pad id), and a model with unmerged LoRA adapters records their
settings under ``"lora"``; both go into every directory written for it, so a
training checkpoint describes the model exactly as ``RUN/model`` does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_save, atomic_write_json
from gptlab.models import FAMILIES, empty_model
from gptlab.models.config import ConfigError, ModelConfig

FORMAT = "gptlab"


def is_native_dir(path: str | Path) -> bool:
    """True for a directory whose config.json was written by gptlab."""
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def save_model_dir(model: nn.Module, out: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Write weights (safetensors, tied weights stored once), config and tokenizer atomically.

    ``config.json`` gets ``model.config_extra`` (if the model has it), the LoRA
    settings of unmerged adapters, then ``extra``.
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
    meta = {"format": FORMAT, "model": model.cfg.to_dict(), **(getattr(model, "config_extra", None) or {})}
    lora = getattr(model, "lora_config", None)
    if lora is not None:  # the adapters' keys are in the weights: record how to rebuild them
        meta["lora"] = dataclasses.asdict(lora)
    if extra:
        meta.update(extra)
    atomic_write_json(out / "config.json", meta)
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def read_config(path: str | Path) -> ModelConfig:
    """The model config stored in a gptlab model directory, with a clear error if it is broken."""
    p = Path(path) / "config.json"
    try:
        meta = json.loads(p.read_text())
        return ModelConfig.from_dict(meta["model"])
    except FileNotFoundError:
        raise GptlabError(f"{p} not found; a gptlab model directory needs config.json and model.safetensors") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise GptlabError(f"{p} is not a valid gptlab config ({e}); re-export or retrain the model") from None
    except ConfigError as e:
        raise GptlabError(f"{p}: {e}") from None


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``, naming every missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    # Tied weights are stored once; a key is satisfied when an alias of it is present.
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    tied = {n for names in aliases.values() if len(names) > 1 and any(m in state for m in names) for n in names}
    missing = sorted(set(own) - set(state) - tied)
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if shapes:
        problems.append("wrong shapes " + "; ".join(shapes[:5]))
    if problems:
        raise GptlabError(f"{source} does not match its config: " + "; ".join(problems)
                          + " (was the checkpoint written for another model size?)")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()


def classifier_head(path: Path, vocab_size: int | None) -> tuple[int, bool] | None:
    """(rows, has bias) of the output head in ``path/model.safetensors`` when it is not an LM head, else None.

    An LM head has ``vocab_size`` rows and no bias; a head from ``replace_output_head``
    (a classifier) has one row per class and a bias. Only the file's header is read.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            keys = set(f.keys())
            for name in sorted({f.model.HEAD for f in FAMILIES.values()}):
                if f"{name}.weight" in keys:
                    rows = f.get_slice(f"{name}.weight").get_shape()[0]
                    bias = f"{name}.bias" in keys
                    if bias or (vocab_size is not None and rows != vocab_size):
                        return rows, bias
    except (SafetensorError, OSError, ValueError):
        pass  # missing or damaged: the loader reports it
    return None


def refuse_classifier(path: Path, ref: str, why: str = "it does not generate text",
                      alternative: str = "") -> None:
    """A directory saved by ``gptlab finetune classify`` holds a classifier, not an LM: say so before loading.

    Recognised by the ``classifier`` entry of its config.json, or, for a checkpoint
    written without one, by its output head (rows != vocab_size, or a bias).
    """
    cfgfile = path / "config.json"
    try:
        meta = json.loads(cfgfile.read_text()) if path.is_dir() and cfgfile.is_file() else None
        info = meta.get("classifier") if meta else None
        vocab = meta.get("model", {}).get("vocab_size") if meta else None
    except (OSError, ValueError, AttributeError):
        return  # not readable as a gptlab config: the loader reports it
    tail = f"; use it with `gptlab classify {ref} TEXT`" + (f", {alternative}" if alternative else "")
    if info:
        labels = [str(x) for x in info.get("labels", [])] if isinstance(info, dict) else []
        shown = ", ".join(labels[:4]) + (", ..." if len(labels) > 4 else "")
        raise GptlabError(f"{ref} is a classifier ({len(labels)} labels: {shown}) made by `gptlab finetune "
                          f"classify`, not a language model, and {why}" + tail)
    native = meta is not None and meta.get("format") == FORMAT
    head = classifier_head(path, vocab) if native and (path / "model.safetensors").is_file() else None
    if head:
        rows, bias = head
        raise GptlabError(f"{ref} is a classifier (its output head has {rows} outputs{' and a bias' if bias else ''}"
                          f", not one per token of the {vocab}-token vocabulary), not a language model, and {why}"
                          + tail)


def load_model_dir(path: str | Path, *, dtype: torch.dtype | None = None, device=None) -> nn.Module:
    """Load a gptlab model directory, strictly checked. Builds on the meta device (no double RAM)."""
    path = Path(path)
    refuse_classifier(path, str(path))
    cfg = read_config(path)
    wfile = path / "model.safetensors"
    if not wfile.is_file():
        raise GptlabError(f"{wfile} not found; the model directory is incomplete (was training interrupted before the first checkpoint?)")
    try:
        state = load_file(str(wfile), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise GptlabError(f"{wfile} is corrupt or truncated ({e}); restore it from another checkpoint") from None
    model = empty_model(cfg)
    load_state_strict(model, state, str(wfile))
    model.finish_loading()  # non-persistent buffers (RoPE tables) left on meta, then tying
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()
