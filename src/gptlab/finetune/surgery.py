"""Model surgery shared by every fine-tuning recipe: find the parts, swap the head, freeze.

Works for every gptlab family through the model interface
(:class:`gptlab.models.LanguageModel`): ``get_head``/``set_head``,
``get_blocks`` and ``get_final_norm``, never attribute names.

Freezing policies (``trainable=``):

    "last-N"   the last N blocks + final norm + head train (the course's chapter 6
               recipe is "last-1"); "head" is "last-0"
    "all"      every parameter trains
    "lora"     only LoRA adapters train (plus the head when it was replaced)
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.models.base import LanguageModel

def _interface(model: nn.Module) -> LanguageModel:
    if not isinstance(model, LanguageModel):
        raise GptlabError(f"{type(model).__name__} is not a gptlab model (gptlab.models.LanguageModel); "
                          "fine-tuning needs one: load it with gptlab.load_model")
    return model


def head_name(model: nn.Module) -> str:
    """Attribute name of the model's output head (``out_head`` for GPT-2, ``lm_head`` for Llama)."""
    return _interface(model).HEAD


def output_head(model: nn.Module) -> nn.Module:
    """The model's output head module."""
    return _interface(model).get_head()


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks, in order."""
    return _interface(model).get_blocks()


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last block."""
    return _interface(model).get_final_norm()


def replace_output_head(model: nn.Module, n_out: int, *, bias: bool = True, seed: int | None = None) -> nn.Linear:
    """Swap the LM head (d -> V) for a fresh ``nn.Linear`` (d -> n_out), e.g. an n-class classifier.

    The model's config is updated to ``tie_embeddings=False`` (the new head is
    not the embedding), so a saved classifier reloads with its own head.
    """
    if n_out < 1:
        raise GptlabError(f"the new head needs at least one output, got n_out={n_out}")
    old = output_head(model)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    new = nn.Linear(model.cfg.emb_dim, n_out, bias=bias)
    with torch.no_grad():  # nn.Linear's own init (Kaiming uniform), but reproducible from `seed`
        bound = 1.0 / model.cfg.emb_dim ** 0.5
        new.weight.uniform_(-bound, bound, generator=gen)
        if bias:
            new.bias.uniform_(-bound, bound, generator=gen)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    model.set_head(new)
    if model.cfg.tie_embeddings:
        model.cfg = model.cfg.replace(tie_embeddings=False)
    return new


def parse_trainable(trainable: str) -> tuple[str, int]:
    """``"last-2"`` -> ("last", 2); ``"head"`` -> ("last", 0); ``"all"``; ``"lora"``."""
    t = trainable.strip().lower()
    if t in ("all", "lora"):
        return t, 0
    if t == "head":
        return "last", 0
    m = re.fullmatch(r"last-?(\d+)", t)
    if m:
        return "last", int(m.group(1))
    raise GptlabError(f"trainable={trainable!r} is not a freezing policy: use 'last-N' (last N blocks + final norm "
                      "+ head, e.g. last-2), 'head', 'all' or 'lora'")


def apply_freezing(model: nn.Module, trainable: str) -> dict[str, int]:
    """Set ``requires_grad`` by policy (see the module docstring); returns parameter counts.

    LoRA adapters must already be attached for ``"lora"`` (see :mod:`gptlab.finetune.lora`);
    parameters whose name contains ``lora_`` always train under that policy, and
    so does a head that is not the LM head (a classifier head).
    """
    kind, n = parse_trainable(trainable)
    if kind == "all":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if kind == "last":
            layers = blocks(model)
            if n > len(layers):
                raise GptlabError(f"trainable=last-{n} but the model has only {len(layers)} blocks; "
                                  f"use last-{len(layers)} or all")
            for block in list(layers)[len(layers) - n:]:
                block.requires_grad_(True)
            final_norm(model).requires_grad_(True)
            output_head(model).requires_grad_(True)
        else:  # lora
            found = False
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)
                    found = True
            if not found:
                raise GptlabError("trainable='lora' but the model has no LoRA adapters; call add_lora(model, ...) first")
            head = output_head(model)
            if head.out_features != model.cfg.vocab_size:  # a task head is new: it must train
                head.requires_grad_(True)
    # A tied embedding shares the head's Parameter: it trains exactly when the head does.
    return count_parameters(model)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"total": ..., "trainable": ...} counting each shared Parameter once."""
    seen, total, train = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        train += p.numel() if p.requires_grad else 0
    return {"total": total, "trainable": train}
