"""The teacher terms of a distillation loss, and how ``--mode`` names and weighs them.

Legend: B batch, T tokens, V vocabulary, d_s / d_t student / teacher width, L_s / L_t their layer counts.

Terms computed on the student's own tokens, so both models must share one tokenizer ("dense" terms):

- ``logits`` (response-based, Hinton et al. 2015, https://arxiv.org/abs/1503.02531):
  T²·KL(softmax(teacher/T) ‖ softmax(student/T)) per counted token.
- ``features`` (feature-based, FitNets https://arxiv.org/abs/1412.6550, TinyBERT
  https://arxiv.org/abs/1909.10351): at each mapped layer pair (i ← j), the distance between the
  output of student block i, through a learned linear projection W_i (d_s -> d_t; none when the widths
  agree), and the output of teacher block j: ``mse`` = mean over tokens and dims of (W h_s − h_t)²,
  ``cosine`` = mean over tokens of 1 − cos(W h_s, h_t); averaged over the pairs.
- ``relations`` (relation-based, e.g. MiniLM https://arxiv.org/abs/2002.10957): at each mapped pair,
  the token-to-token cosine-similarity matrix G = ĥ ĥᵀ (B, T, T) of the student against the teacher's,
  mean squared difference over the pairs of counted tokens. G is T×T whatever the width: no projection.

With ``alpha`` the run's loss is ``(1 − alpha)·CE(student, labels) + alpha·Σ w_m·term_m``.

``--mode`` syntax: terms joined by ``+`` (or ``,``), each ``NAME`` or ``NAME:WEIGHT`` (weight 1 when
omitted): ``logits``, ``logits+features``, ``logits:0.5,features:0.5``, ``sequence+logits``. One data mode
(``sequence``, ``blackbox``, ``reasoning``: where the training text comes from; no weight) may join;
``blackbox`` and ``reasoning`` train on the teacher's answers alone, so they stand alone.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.training.batches import Batch

IGNORE = -100
DENSE = ("logits", "features", "relations")  # the teacher reads the student's tokens: one tokenizer
DATA = ("sequence", "blackbox", "reasoning")  # the teacher writes the training text
TEXT_ONLY = ("blackbox", "reasoning")  # (prompt, answer) pairs, the prompt masked: no dense term can join
FEATURE_LOSSES = ("mse", "cosine")


def parse_modes(spec: str) -> dict[str, float]:
    """``"logits:0.5+features"`` -> ``{"logits": 0.5, "features": 1.0}`` (order kept), checked.

    A data mode maps to weight 1.0 and takes no weight of its own.
    """
    text = str(spec or "").strip()
    terms: dict[str, float] = {}
    for part in text.replace(",", "+").split("+"):
        name, _, weight = part.strip().partition(":")
        name = name.strip()
        if name not in DENSE + DATA:
            raise GptlabError(f"mode={spec!r}: {name!r} is not a mode; use {', '.join(DENSE + DATA)}, joined by + "
                              "with optional :WEIGHT (e.g. logits+features or logits:0.5,features:0.5)")
        if name in terms:
            raise GptlabError(f"mode={spec!r} names {name} twice")
        if weight and name in DATA:
            raise GptlabError(f"mode={spec!r}: {name} sets where the training text comes from and takes no weight")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise GptlabError(f"mode={spec!r}: weight {weight!r} of {name} is not a number") from None
        if not (w >= 0 and math.isfinite(w)):
            raise GptlabError(f"mode={spec!r}: weight {weight} of {name} must be >= 0")
        terms[name] = w
    data = [m for m in terms if m in DATA]
    if len(data) > 1:
        raise GptlabError(f"mode={spec!r} names {' and '.join(data)}; a run takes its text from one of them")
    if data and data[0] in TEXT_ONLY and len(terms) > 1:
        raise GptlabError(f"mode={spec!r}: {data[0]} trains on the teacher's answers alone, so it cannot add "
                          f"{'+'.join(m for m in terms if m in DENSE)} (use sequence+logits with a local teacher)")
    return terms


def dense_terms(modes: dict[str, float]) -> dict[str, float]:
    """The weighted teacher terms of ``modes`` (those computed on the student's tokens)."""
    return {m: w for m, w in modes.items() if m in DENSE}


# ---- layer mapping -----------------------------------------------------------------------------

def auto_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Student layer i <- teacher layer round((i + 1)·L_t / L_s) − 1 (halves round up): spread evenly,
    the last student layer on the last teacher layer."""
    return [(i, max(0, math.floor((i + 1) * n_teacher / n_student + 0.5) - 1)) for i in range(n_student)]


def parse_layer_map(spec: str, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """``"auto"`` (see :func:`auto_layer_map`) or ``"0:2,1:5"`` (student:teacher pairs, 0-based), checked."""
    text = str(spec or "auto").strip()
    if text == "auto":
        return auto_layer_map(n_student, n_teacher)
    pairs = []
    for part in text.split(","):
        s, sep, t = part.strip().partition(":")
        if not sep or not s.strip().isdigit() or not t.strip().isdigit():
            raise GptlabError(f"layer_map={spec!r}: {part.strip()!r} is not STUDENT:TEACHER; give 'auto' or pairs "
                              "of 0-based layer numbers such as 0:2,1:5")
        i, j = int(s), int(t)
        if i >= n_student or j >= n_teacher:
            raise GptlabError(f"layer_map={spec!r}: {i}:{j} is out of range; the student has layers 0-{n_student - 1}, "
                              f"the teacher 0-{n_teacher - 1}")
        if i in (p[0] for p in pairs):
            raise GptlabError(f"layer_map={spec!r} maps student layer {i} twice")
        pairs.append((i, j))
    return pairs


class Projections(nn.Module):
    """One learned linear map d_s -> d_t per mapped layer pair (identity where the widths agree).

    It trains with the student (the loop's ``aux``), is saved in each checkpoint's ``state.pt`` and in
    ``RUN/feature_projections.safetensors``, and is no part of the exported student.
    """

    def __init__(self, n_pairs: int, d_student: int, d_teacher: int):
        super().__init__()
        self.maps = nn.ModuleList([nn.Linear(d_student, d_teacher, bias=False) if d_student != d_teacher
                                   else nn.Identity() for _ in range(n_pairs)])

    def forward(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self.maps[k](h)  # (B, T, d_s) -> (B, T, d_t)


@contextlib.contextmanager
def block_outputs(model: nn.Module, layers):
    """Collect ``{i: output of block i (B, T, d)}`` during the forward passes inside the ``with``.

    The blocks are reached through :meth:`LanguageModel.get_blocks`, as every family provides them.
    """
    blocks = model.get_blocks()
    out: dict[int, torch.Tensor] = {}
    hooks = [blocks[i].register_forward_hook(lambda mod, args, o, i=i: out.__setitem__(i, o))
             for i in sorted(set(layers))]
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()


# ---- the terms ---------------------------------------------------------------------------------

def _masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return (values * keep).sum() / keep.sum().clamp(min=1)


def _student_ce(s_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The student's next-token cross-entropy over the counted tokens (0 when none is)."""
    n = (y != IGNORE).sum().clamp(min=1)
    return F.cross_entropy(s_logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum") / n


def kl_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, keep: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)) per token, averaged over ``keep`` (B, T); logits (B, T, V)."""
    if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise GptlabError(f"teacher vocabulary {teacher_logits.shape[-1]} != student vocabulary "
                          f"{student_logits.shape[-1]}; distillation needs the same tokenizer")
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return _masked_mean((log_pt.exp() * (log_pt - log_ps)).sum(-1), keep.float())


def feature_distance(hs: torch.Tensor, ht: torch.Tensor, keep: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Distance of projected student states ``hs`` (B, T, d_t) to teacher states ``ht`` (B, T, d_t), averaged
    over the counted tokens ``keep`` (B, T): ``mse`` (mean over dims of the squared difference) or ``cosine``
    (1 − cosine similarity)."""
    hs, ht = hs.float(), ht.float()
    if kind == "mse":
        per_token = (hs - ht).pow(2).mean(-1)  # (B, T)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-8)  # (B, T)
    else:
        raise GptlabError(f"feature_loss={kind!r} must be one of {', '.join(FEATURE_LOSSES)}")
    return _masked_mean(per_token, keep.float())


def similarity(h: torch.Tensor) -> torch.Tensor:
    """Token-to-token cosine similarities (B, T, T) of hidden states (B, T, d)."""
    n = F.normalize(h.float(), dim=-1, eps=1e-8)
    return n @ n.transpose(1, 2)


def relation_distance(hs: torch.Tensor, ht: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the student's and teacher's similarity matrices over pairs of counted tokens."""
    pair = (keep[:, :, None] & keep[:, None, :]).float()  # (B, T, T)
    return _masked_mean((similarity(hs) - similarity(ht)).pow(2), pair)


class DistillationTask:
    """The :class:`gptlab.training.loop.Task` of dense distillation (teacher frozen, in eval mode).

    ``loss = (1 − alpha)·CE + alpha·Σ w_m·term_m`` over ``terms`` (default ``{"logits": 1}``, whose term is
    T²·KL). ``layer_map``: the (student, teacher) block pairs of ``features``/``relations``; ``projections``:
    their :class:`Projections` (the loop's ``aux``). ``evaluate`` reports the plain cross-entropy as
    ``loss`` (what model selection looks at), each term's value and ``distill_loss``.
    """

    def __init__(self, teacher: nn.Module, alpha: float = 0.5, temperature: float = 2.0, *,
                 terms: dict[str, float] | None = None, layer_map: list[tuple[int, int]] | None = None,
                 projections: Projections | None = None, feature_loss: str = "mse"):
        if not 0.0 <= alpha <= 1.0:
            raise GptlabError(f"alpha={alpha} must be in [0, 1] (0 = no teacher, 1 = teacher only)")
        if temperature <= 0:
            raise GptlabError(f"temperature={temperature} must be > 0")
        if feature_loss not in FEATURE_LOSSES:
            raise GptlabError(f"feature_loss={feature_loss!r} must be one of {', '.join(FEATURE_LOSSES)}")
        self.terms = dict(terms if terms is not None else {"logits": 1.0})
        if ("features" in self.terms or "relations" in self.terms) and not layer_map:
            raise GptlabError("features/relations distillation needs a layer map (student:teacher pairs)")
        if "features" in self.terms and (projections is None or len(projections.maps) != len(layer_map)):
            raise GptlabError("features distillation needs one projection per mapped layer pair")
        self.teacher, self.alpha, self.T = teacher.eval(), alpha, temperature
        self.layer_map, self.projections, self.feature_loss = list(layer_map or []), projections, feature_loss
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def parts(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"total", "ce", TERM...}`` of one batch (gradients flow through the student's parts)."""
        x, y = batch[0], batch[1]
        keep = y != IGNORE  # (B, T)
        hidden = bool(self.layer_map) and ("features" in self.terms or "relations" in self.terms)
        s_layers, t_layers = [i for i, _ in self.layer_map], [j for _, j in self.layer_map]
        with torch.no_grad(), (block_outputs(self.teacher, t_layers) if hidden else contextlib.nullcontext({})) as th:
            # (B, T, V); without a logits term the head is skipped (features: (B, T, d_t), unused)
            t_logits = self.teacher(x) if "logits" in self.terms else self.teacher.features(x)
        with block_outputs(model, s_layers) if hidden else contextlib.nullcontext({}) as sh:
            s_logits = model(x)  # (B, T, V)
        out = {"ce": _student_ce(s_logits, y)}
        if "logits" in self.terms:
            out["kl"] = kl_term(s_logits, t_logits, keep, self.T)
        if "features" in self.terms:
            out["features"] = torch.stack([feature_distance(self.projections(k, sh[i]), th[j], keep, self.feature_loss)
                                           for k, (i, j) in enumerate(self.layer_map)]).mean()
        if "relations" in self.terms:
            out["relations"] = torch.stack([relation_distance(sh[i], th[j], keep) for i, j in self.layer_map]).mean()
        teacher_part = sum(w * (self.T ** 2 * out["kl"] if m == "logits" else out[m]) for m, w in self.terms.items())
        out["total"] = (1 - self.alpha) * out["ce"] + self.alpha * teacher_part
        return out

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        if self.alpha == 0.0:  # the teacher's terms weigh nothing: plain training, the teacher is not run
            return _student_ce(model(batch[0]), batch[1])
        return self.parts(model, batch)["total"]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[Batch]) -> dict[str, float]:
        runs = [{k: float(v) for k, v in self.parts(model, b).items()} for b in batches]
        mean = {k: sum(r[k] for r in runs) / max(1, len(runs)) for k in (runs[0] if runs else {})}
        ce = mean.get("ce", 0.0)
        return ({"loss": ce, "perplexity": math.exp(min(ce, 50.0))}
                | {k: v for k, v in mean.items() if k not in ("ce", "total")} | {"distill_loss": mean.get("total", 0.0)})
