"""Declarative key maps between Hugging Face checkpoints and gptlab modules.

Each family declares one table of :class:`KeyRule` rows in its own file (``Family.hf_keys``): our parameter name, the
checkpoint's name, whether the tensor is stored transposed, and (optionally)
the config condition under which the row applies. ``{i}`` stands for the layer
index. Loading (``weights/hf.py``) and export (``weights/export.py``) read the
same table in opposite directions, and :func:`plan_import` checks a checkpoint
against it strictly: every missing, unexpected or mis-shaped key is reported
by name.

GPT-2 checkpoints use OpenAI's ``Conv1D`` layers, whose weights are stored as
(in, out) rather than ``nn.Linear``'s (out, in); those rows are transposed.
"""

from __future__ import annotations

import re

from gptlab.errors import GptlabError
from gptlab.models.config import KeyRule, ModelConfig, get_family


# Checkpoint entries that are derived data, not weights: skipped on load.
IGNORED: list[str] = [
    r".*\.attn\.(masked_)?bias$",  # GPT-2's stored causal mask buffers
    r".*rotary_emb\.inv_freq$",  # old Llama checkpoints saved the RoPE table
]
# A tied model's head is the embedding; a checkpoint may still store a copy.
TIED_HEAD = "lm_head.weight"


def expand(family: str, cfg: ModelConfig) -> list[KeyRule]:
    """The family's key map with ``{i}`` expanded and conditional rows resolved for ``cfg``."""
    table = get_family(family).hf_keys
    if not table:
        raise GptlabError(f"model family {family!r} has no Hugging Face key map")
    rules = [r for r in table if r.when is None or r.when(cfg)]
    per_layer = [r for r in rules if "{i}" in r.ours]
    first = next((n for n, r in enumerate(rules) if "{i}" in r.ours), len(rules))
    before = [r for r in rules[:first] if "{i}" not in r.ours]
    after = [r for r in rules[first:] if "{i}" not in r.ours]
    rows = list(before)
    for i in range(cfg.n_layers):  # layer by layer, in table order within a layer
        rows += [KeyRule(r.ours.replace("{i}", str(i)), r.theirs.replace("{i}", str(i)), r.transpose)
                 for r in per_layer]
    rows += after
    return rows


def normalize_keys(family: str, keys: list[str]) -> dict[str, str]:
    """Map each checkpoint key to its canonical name (adding a missing base-model prefix)."""
    prefix = get_family(family).hf_prefix
    if any(k.startswith(prefix) for k in keys):
        return {k: k for k in keys}
    return {k: (k if k == TIED_HEAD else prefix + k) for k in keys}


def _list(names: list[str], limit: int = 6, sep: str = ", ") -> str:
    shown = sep.join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def plan_import(family: str, cfg: ModelConfig, ckpt_shapes: dict[str, tuple[int, ...]],
                model_shapes: dict[str, tuple[int, ...]], source: str) -> list[tuple[str, str, bool]]:
    """Match checkpoint tensors to model parameters; raise naming every problem.

    ``ckpt_shapes`` maps checkpoint keys (as stored) to shapes; ``model_shapes``
    maps our state-dict keys to shapes. Returns ``(ours, stored_key, transpose)``
    rows to copy.
    """
    canon = normalize_keys(family, list(ckpt_shapes))
    by_canon = {c: k for k, c in canon.items()}
    rows = expand(family, cfg)
    wanted = {r.theirs for r in rows}
    plan, missing, shapes = [], [], []
    for r in rows:
        stored = by_canon.get(r.theirs)
        if stored is None:
            missing.append(r.theirs)
            continue
        shape = tuple(ckpt_shapes[stored])
        if r.transpose and len(shape) == 2:
            shape = shape[::-1]
        want = tuple(model_shapes.get(r.ours, ()))
        if shape != want:
            shown = f"{tuple(ckpt_shapes[stored])}" + (" (stored transposed)" if r.transpose else "")
            shapes.append(f"{stored} is {shown}, expected {want}")
        plan.append((r.ours, stored, r.transpose))
    ignored = re.compile("|".join(IGNORED))
    unexpected = sorted(k for k, c in canon.items() if c not in wanted and not ignored.match(c)
                        and not (c == TIED_HEAD and cfg.tie_embeddings))
    # The table must cover every parameter the model has (a bug in gptlab otherwise).
    covered = {r.ours for r in rows} | ({get_family(family).model.head_key()} if cfg.tie_embeddings else set())
    uncovered = sorted(set(model_shapes) - covered)
    problems = []
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes: {_list(shapes, 4, sep='; ')}")
    if uncovered:
        problems.append(f"gptlab key map does not cover model parameters {_list(uncovered)} (please report this bug)")
    if problems:
        raise GptlabError(f"{source} does not match its config.json: " + "; ".join(problems)
                          + ". Check that config.json belongs to these weights and the download is complete.")
    return plan
