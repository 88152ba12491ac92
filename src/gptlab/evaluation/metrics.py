"""Classification metrics: accuracy, per-class precision / recall / F1, confusion matrix.

Plain Python on lists of class indices, so they are easy to check by hand:

    precision_c = TP_c / (TP_c + FP_c)    (predicted c, and it was c)
    recall_c    = TP_c / (TP_c + FN_c)    (was c, and predicted c)
    F1_c        = 2 · P · R / (P + R)
    confusion[i][j] = number of items whose true class is i and predicted class is j

A ratio with a zero denominator is reported as 0.0 (scikit-learn's
``zero_division=0``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from gptlab.errors import GptlabError


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of items predicted correctly."""
    _check(y_true, y_pred)
    return sum(int(a == b) for a, b in zip(y_true, y_pred)) / len(y_true)


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> list[list[int]]:
    """Rows are true classes, columns predicted classes."""
    _check(y_true, y_pred)
    m = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(y_true, y_pred):
        if not (0 <= t < n_classes and 0 <= p < n_classes):
            raise GptlabError(f"class index out of range 0..{n_classes - 1}: true {t}, predicted {p}")
        m[t][p] += 1
    return m


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, per-class and macro-averaged precision/recall/F1, and the confusion matrix.

    Args:
        y_true: true class indices.
        y_pred: predicted class indices.
        labels: class names, index i -> labels[i].
    """
    n = len(labels)
    cm = confusion_matrix(y_true, y_pred, n)
    per_class = {}
    for c, name in enumerate(labels):
        tp = cm[c][c]
        fp = sum(cm[r][c] for r in range(n)) - tp
        fn = sum(cm[c]) - tp
        p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        per_class[name] = {"precision": p, "recall": r, "f1": _ratio(2 * p * r, p + r), "support": sum(cm[c])}
    macro = {k: sum(v[k] for v in per_class.values()) / n for k in ("precision", "recall", "f1")}
    return {"accuracy": accuracy(y_true, y_pred), "n": len(y_true), "per_class": per_class,
            "macro": macro, "confusion_matrix": cm, "labels": list(labels)}


@torch.no_grad()
def classifier_accuracy(model: torch.nn.Module, batches, select=None) -> float:
    """Accuracy of a classifier over ``(x, y[, last_index])`` batches.

    ``select(model, batch) -> logits (B, C)``; the default takes the logits of the
    last position of ``model(x)``.
    """
    correct = total = 0
    for batch in batches:
        x, y = batch[0], batch[1]
        logits = select(model, batch) if select is not None else model(x)[:, -1]
        correct += int((logits.argmax(-1) == y).sum())
        total += int(y.numel())
    if total == 0:
        raise GptlabError("no examples to measure accuracy on")
    return correct / total


def _check(y_true: Sequence[int], y_pred: Sequence[int]) -> None:
    if len(y_true) != len(y_pred):
        raise GptlabError(f"{len(y_true)} true labels but {len(y_pred)} predictions; they must pair up")
    if not y_true:
        raise GptlabError("no examples to score")
