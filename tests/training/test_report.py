"""The end-of-run diagnosis reads the curves as the course teaches: one case per verdict."""

import math

from gptlab.training.report import diagnose


def _records(train, val):
    return [{"step": 20 * (i + 1), "train_loss": t, "val_loss": v} for i, (t, v) in enumerate(zip(train, val))]


def test_still_falling_validation_is_not_healthy():
    # issue 16: 60 steps, train flat, validation 6.47 -> 6.24 -> 6.15 was called "healthy: fell and flattened"
    d = diagnose(_records([6.40, 6.30, 6.28], [6.47, 6.24, 6.15]))
    assert d.verdict == "underfitting" and "still falling" in d.message and "6.24 -> 6.15" in d.message


def test_healthy_when_both_curves_flatten():
    d = diagnose(_records([5.0, 3.0, 2.5, 2.45, 2.44, 2.44], [5.1, 3.2, 2.7, 2.66, 2.655, 2.655]), vocab_size=4096)
    assert d.verdict == "healthy"


def test_overfitting_names_the_best_step():
    d = diagnose(_records([4.0, 3.0, 2.0, 1.5, 1.0], [4.1, 3.2, 2.8, 3.0, 3.3]))
    assert d.verdict == "overfitting" and d.best_step == 60


def test_unstable_and_too_short():
    assert diagnose(_records([3.0, math.nan, 2.0], [3.0, 3.0, 3.0])).verdict == "unstable"
    assert diagnose(_records([3.0, 2.0], [3.0, 2.0])).verdict == "too short"


def test_barely_below_uniform_is_underfitting():
    d = diagnose(_records([8.3, 8.2, 8.2, 8.2], [8.3, 8.25, 8.25, 8.25]), vocab_size=4096)  # ln 4096 = 8.32
    assert d.verdict == "underfitting" and "uniform-guess" in d.message


def test_a_new_best_at_the_last_evaluation_is_still_improving():
    # make demo: validation 5.253 -> 5.173 -> 5.123, the best at the last step, was called "healthy"
    d = diagnose(_records([6.0, 5.0, 4.5, 4.3, 4.2, 4.107], [6.17, 5.6, 5.4, 5.253, 5.173, 5.123]), vocab_size=4096)
    assert d.verdict == "underfitting" and "still falling" in d.message
