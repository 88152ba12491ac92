"""Classification metrics against hand-computed values."""

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.evaluation.metrics import accuracy, classification_report, classifier_accuracy, confusion_matrix


def test_report_by_hand():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 1, 0, 1, 2, 2]
    assert confusion_matrix(y_true, y_pred, 3) == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    r = classification_report(y_true, y_pred, ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(4 / 6)
    a, b, c = (r["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"]) == (1.0, pytest.approx(2 / 3)) and a["f1"] == pytest.approx(0.8)
    assert (b["precision"], b["recall"], b["f1"]) == (0.5, 0.5, 0.5)
    assert (c["precision"], c["recall"]) == (0.5, 1.0) and c["f1"] == pytest.approx(2 / 3)
    assert r["macro"]["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # A class never predicted: precision 0 by convention, not a crash.
    assert classification_report([0, 1], [0, 0], ["x", "y"])["per_class"]["y"]["precision"] == 0.0


def test_classifier_accuracy_on_batches():
    class Fixed(torch.nn.Module):
        def forward(self, x):  # predicts class = first token, at every position
            return torch.nn.functional.one_hot(x[:, :1].expand_as(x), 3).float()

    batches = [(torch.tensor([[0, 5], [2, 5]]), torch.tensor([0, 1])), (torch.tensor([[1, 5]]), torch.tensor([1]))]
    assert classifier_accuracy(Fixed(), batches) == pytest.approx(2 / 3)


def test_bad_inputs():
    with pytest.raises(GptlabError, match="must pair up"):
        accuracy([0, 1], [0])
    with pytest.raises(GptlabError, match="no examples"):
        accuracy([], [])
    with pytest.raises(GptlabError, match="out of range"):
        confusion_matrix([0, 3], [0, 1], 2)
