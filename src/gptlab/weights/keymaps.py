"""The one key-map dialect and the one strict checker, shared by every checkpoint format.

A key map is a table of :class:`~gptlab.models.config.KeyRule` rows: our
parameter name, the checkpoint's name, whether the tensor is stored transposed,
and (optionally) the config condition under which the row applies. ``{i}``
stands for the layer index. Each family declares its Hugging Face table in its
own file (``Family.hf_keys``); GGUF's table lives in ``weights/gguf.py``; a
gptlab directory stores our own names, so its table is the model's state-dict
keys (:func:`state_rules`). Loading reads a table one way, export
(``weights/export.py``) and LoRA's peft names the other way.

:func:`check_strict` matches a checkpoint against a table and the model built
for its config: every missing, unexpected or mis-shaped key is reported by
name, in one :class:`GptlabError`.

GPT-2 checkpoints use OpenAI's ``Conv1D`` layers, whose weights are stored as
(in, out) rather than ``nn.Linear``'s (out, in); those rows are transposed.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Iterable, Sequence

import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.models.config import KeyRule, ModelConfig, get_family

# Checkpoint entries that are derived data, not weights: skipped when loading a HF directory.
IGNORED: list[str] = [
    r".*\.attn\.(masked_)?bias$",  # GPT-2's stored causal mask buffers
    r".*rotary_emb\.inv_freq$",  # old Llama checkpoints saved the RoPE table
]
# A tied model's head is the embedding; a checkpoint may still store a copy.
TIED_HEAD = "lm_head.weight"


def expand_rules(table: Sequence[KeyRule], cfg: ModelConfig) -> list[KeyRule]:
    """``table`` with ``{i}`` expanded for ``cfg.n_layers`` layers and conditional rows resolved for ``cfg``.

    Rows before the first per-layer row come first, then layer by layer (in table
    order within a layer), then the rest.
    """
    rules = [r for r in table if r.when is None or r.when(cfg)]
    per_layer = [r for r in rules if "{i}" in r.ours]
    first = next((n for n, r in enumerate(rules) if "{i}" in r.ours), len(rules))
    rows = [r for r in rules[:first] if "{i}" not in r.ours]
    for i in range(cfg.n_layers):
        for r in per_layer:
            rows += _experts(KeyRule(r.ours.replace("{i}", str(i)), r.theirs.replace("{i}", str(i)), r.transpose),
                             getattr(cfg, "n_experts", 0))  # a field of the families that have experts (llama)
    return rows + [r for r in rules[first:] if "{i}" not in r.ours]


def _experts(rule: KeyRule, n_experts: int) -> list[KeyRule]:
    """``rule`` once per expert when it names ``{e}``: a stored tensor each, or slices of one stacked tensor."""
    if "{e}" not in rule.ours:
        return [rule]
    stacked = "{e}" not in rule.theirs
    return [KeyRule(rule.ours.replace("{e}", str(e)), rule.theirs.replace("{e}", str(e)), rule.transpose,
                    index=e if stacked else None) for e in range(n_experts)]


def expand(family: str, cfg: ModelConfig) -> list[KeyRule]:
    """The family's Hugging Face key map (``Family.hf_keys``), expanded for ``cfg``."""
    table = get_family(family).hf_keys
    if not table:
        raise GptlabError(f"model family {family!r} has no Hugging Face key map")
    return expand_rules(table, cfg)


def theirs_pattern(rule: KeyRule) -> re.Pattern:
    """A regex matching the checkpoint names of ``rule`` (``{i}`` captured as group ``i``)."""
    return re.compile("^" + re.escape(rule.theirs).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
                      + "$")


def normalize_keys(family: str, keys: list[str]) -> dict[str, str]:
    """Map each HF checkpoint key to its canonical name (adding a missing base-model prefix)."""
    prefix = get_family(family).hf_prefix
    if any(k.startswith(prefix) for k in keys):
        return {k: k for k in keys}
    return {k: (k if k == TIED_HEAD else prefix + k) for k in keys}


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Names sharing one parameter (a tied head and embedding), in state-dict order."""
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    return [names for names in groups.values() if len(names) > 1]


def state_rules(model: nn.Module, stored: Iterable[str]) -> tuple[list[KeyRule], set[str]]:
    """The identity key map of a checkpoint in our own names (a gptlab directory), and the keys to ignore.

    A tied weight is stored once: its row names whichever alias the checkpoint
    holds, and a second stored alias is ignored.
    """
    stored = set(stored)
    skip, ignore = set(), set()
    for names in _alias_groups(model):
        keep = next((n for n in names if n in stored), names[0])
        skip |= set(names) - {keep}
        ignore |= (set(names) - {keep}) & stored
    return [KeyRule(k, k) for k in model.state_dict() if k not in skip], ignore


def _list(names: list[str], limit: int = 6, sep: str = ", ") -> str:
    shown = sep.join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def _pylist(names: list[str]) -> str:
    return f"{names[:5]}{' ...' if len(names) > 5 else ''}"


def check_strict(rules: list[KeyRule], stored: dict[str, tuple[int, ...]], model: nn.Module, source: str, *,
                 ignore: Callable[[str], bool] = lambda key: False, by: str = "checkpoint") -> list[KeyRule]:
    """Match checkpoint tensors to the model's parameters through ``rules``; raise naming every problem.

    Args:
        rules: the expanded key map (ours <-> stored name, transpose).
        stored: checkpoint key -> shape, as stored (read from headers, nothing loaded).
        model: the model built for the checkpoint's config (meta device is fine).
        source: the checkpoint, for the message.
        ignore: stored keys that are not weights (derived buffers, a tied copy).
        by: whose names the message uses: ``"checkpoint"`` (a foreign format: the names
            in the user's file) or ``"model"`` (our state-dict names).

    Returns the rules whose tensors are to be copied (every rule, once nothing is wrong).
    """
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, wrong = [], []
    stacks = Counter(r.theirs for r in rules if r.index is not None)  # stacked tensor -> experts read from it
    for r in rules:
        if r.theirs not in stored:
            missing.append(r.theirs if by == "checkpoint" else r.ours)
            continue
        shape = tuple(stored[r.theirs])
        if r.index is not None:  # one expert's slice of a stacked (E, ...) tensor
            if not shape or shape[0] != stacks[r.theirs]:
                if r.index == 0:
                    wrong.append(f"{r.theirs} is {shape}, expected {stacks[r.theirs]} experts stacked on dim 0"
                                 if by == "checkpoint" else f"{r.theirs}: {shape} does not stack "
                                 f"{stacks[r.theirs]} experts")
                continue
            shape = shape[1:]
        got = shape[::-1] if r.transpose and len(shape) == 2 else shape
        want = own.get(r.ours, ())
        if got != want:
            wrong.append(f"{r.theirs} is {shape}" + (" (stored transposed)" if r.transpose else "")
                         + f", expected {want}" if by == "checkpoint"
                         else f"{r.ours}: checkpoint {got} vs model {want}")
    wanted = {r.theirs for r in rules}
    unexpected = sorted(k for k in stored if k not in wanted and not ignore(k))
    # The table must cover every parameter the model has (a bug in gptlab otherwise).
    covered = {r.ours for r in rules}
    covered |= {n for names in _alias_groups(model) if covered & set(names) for n in names}
    uncovered = sorted(set(own) - covered)
    if by == "checkpoint":
        problems = [missing and f"missing keys: {_list(missing)}", unexpected and f"unexpected keys: {_list(unexpected)}",
                    wrong and f"wrong shapes: {_list(wrong, 4, sep='; ')}"]
        tail = ". Check that config.json belongs to these weights and the download is complete."
        head = f"{source} does not match its config.json: "
    else:
        problems = [missing and f"missing keys {_pylist(missing)}", unexpected and f"unexpected keys {_pylist(unexpected)}",
                    wrong and "wrong shapes " + "; ".join(wrong[:5])]
        tail = " (was the checkpoint written for another model size?)"
        head = f"{source} does not match its config: "
    problems.append(uncovered and f"gptlab key map does not cover model parameters {_list(uncovered)} "
                                  "(please report this bug)")
    problems = [p for p in problems if p]
    if problems:
        raise GptlabError(head + "; ".join(problems) + tail)
    return rules
