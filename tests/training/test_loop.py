"""The training loop: exact resume, NaN handling, early stopping, run directory contents."""

import json
import math

import numpy as np
import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.models import build_model, get_preset
from gptlab.training import LanguageModeling, TrainConfig, TrainingDiverged, train_loop, window_batches
from gptlab.training.checkpoint import latest_checkpoint, load_checkpoint
from gptlab.weights.native import load_model_dir


def _setup(seed=0, n_tokens=3000, vocab=50, drop=0.1):
    torch.manual_seed(seed)
    cfg = get_preset("gpt2-nano").replace(vocab_size=vocab, context_length=16, drop_rate=drop)
    model = build_model(cfg)
    rng = np.random.default_rng(seed)
    # A learnable sequence: a repeating pattern with noise.
    base = np.tile(np.arange(vocab), n_tokens // vocab + 1)[:n_tokens]
    noise = rng.integers(0, vocab, n_tokens)
    tokens = np.where(rng.random(n_tokens) < 0.1, noise, base).astype(np.int64)
    train = window_batches(tokens[:2500], 16, 8, batch_size=4, seed=1)
    val = window_batches(tokens[2500:], 16, 16, batch_size=4, shuffle=False, drop_last=False)
    return model, train, val


def _cfg(**kw):
    base = dict(max_steps=12, lr=3e-3, eval_every=4, eval_iters=2, precision="fp32", device="cpu", seed=5)
    base.update(kw)
    return TrainConfig(**base)


class _InterruptAt(LanguageModeling):
    """Raises KeyboardInterrupt (Ctrl-C) in the middle of the n-th micro-batch."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def loss(self, m, batch):
        self.calls += m.training  # count training micro-batches only
        out = super().loss(m, batch)
        if m.training and self.calls == self.n:
            raise KeyboardInterrupt
        return out


@pytest.mark.parametrize("interrupt_at", [9, 10])
def test_resume_is_bitwise_equal_to_uninterrupted(tmp_path, interrupt_at):
    model, train, val = _setup()
    full = train_loop(model, train, val, _cfg(), tmp_path / "full", progress=False)

    model2, train2, val2 = _setup()
    part = train_loop(model2, train2, val2, _cfg(grad_accum=1), tmp_path / "part", task=_InterruptAt(interrupt_at),
               progress=False)
    assert part.stopped_because == "interrupted"
    torch.rand(100)  # disturb the global RNG: resume must restore it
    ck = latest_checkpoint(tmp_path / "part")
    model3, state = load_checkpoint(ck, "cpu")
    assert state["step"] == interrupt_at - 1
    resumed = train_loop(model3, train2, val2, _cfg(), tmp_path / "part", resume_state=state, progress=False)

    a = [(r["step"], r["tokens"], r["train_loss"], r["val_loss"]) for r in full.records]
    b = [(r["step"], r["tokens"], r["train_loss"], r["val_loss"]) for r in resumed.records]
    assert a == b  # bitwise: exact float equality
    for (k, v), (k2, v2) in zip(model.state_dict().items(), model3.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_run_directory_contents(tmp_path):
    model, train, val = _setup()
    res = train_loop(model, train, val, _cfg(), tmp_path, sample_fn=lambda m: "hello", progress=False)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [4, 8, 12]
    for r in lines:
        assert {"step", "tokens", "lr", "train_loss", "val_loss", "tokens_per_s"} <= r.keys()
        assert math.isfinite(r["train_loss"]) and r["tokens"] > 0
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "--- step 12 ---" in (tmp_path / "samples.txt").read_text()
    loaded = load_model_dir(tmp_path / "model")
    assert loaded.cfg == model.cfg
    assert res.diagnosis is not None and res.diagnosis.verdict


class _Clock:
    """A fake ``time`` for the loop: one second passes per training micro-batch (no real waiting)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class _TicksPerBatch(LanguageModeling):
    def __init__(self, clock):
        self.clock = clock

    def loss(self, m, batch):
        self.clock.now += m.training
        return super().loss(m, batch)


def test_time_limit_between_evaluations_evaluates_the_final_state(tmp_path, monkeypatch):
    import gptlab.training.loop as loop

    clock = _Clock()
    monkeypatch.setattr(loop, "time", clock)
    model, train, val = _setup()
    res = train_loop(model, train, val, _cfg(max_steps=None, max_time=5.5), tmp_path, task=_TicksPerBatch(clock),
              sample_fn=lambda m: "hello", progress=False)
    assert res.stopped_because == "max_time" and res.step == 6  # stopped between the evaluations at 4 and 8
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [4, 6]
    assert "--- step 6 ---" in (tmp_path / "samples.txt").read_text()
    assert (tmp_path / "loss.png").exists()
    _, state = load_checkpoint(latest_checkpoint(tmp_path), "cpu")
    assert state["step"] == 6 and state["best_step"] == res.best_step


def test_an_epochs_limit_is_named_as_the_reason_it_stopped(tmp_path):
    model, train, val = _setup()
    res = train_loop(model, train, val, _cfg(max_steps=None, epochs=0.1), tmp_path, progress=False)
    assert res.stopped_because == "epochs" and res.step == math.ceil(0.1 * len(train))
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == res.step


def test_time_limit_before_the_first_evaluation_still_writes_metrics(tmp_path, monkeypatch):
    import gptlab.training.loop as loop

    clock = _Clock()
    monkeypatch.setattr(loop, "time", clock)
    model, train, val = _setup()
    res = train_loop(model, train, val, _cfg(max_steps=None, max_time=2.5), tmp_path, task=_TicksPerBatch(clock),
              sample_fn=lambda m: "hello", progress=False)
    assert res.step == 3 and [r["step"] for r in res.records] == [3]
    for name in ("metrics.jsonl", "loss.png", "samples.txt", "model/config.json"):
        assert (tmp_path / name).exists(), name


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model, train, val = _setup()

    class Exploding(LanguageModeling):
        def loss(self, m, batch):
            out = super().loss(m, batch)
            self.n = getattr(self, "n", 0) + m.training
            return out * float("nan") if self.n > 6 else out

    with pytest.raises(TrainingDiverged, match="loss became nan at step 7.*last good checkpoint"):
        train_loop(model, train, val, _cfg(), tmp_path, task=Exploding(), progress=False)
    ck = latest_checkpoint(tmp_path)
    m, state = load_checkpoint(ck, "cpu")
    assert state["step"] == 4
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_early_stopping_on_val(tmp_path):
    model, train, val = _setup()

    class ValGetsWorse(LanguageModeling):
        calls = 0

        def evaluate(self, m, batches):
            ValGetsWorse.calls += 1
            return {"loss": float(ValGetsWorse.calls)}  # rises every evaluation

    res = train_loop(model, train, val, _cfg(max_steps=40, patience=2), tmp_path, task=ValGetsWorse(), progress=False)
    assert res.stopped_because == "early_stopping"
    assert res.best_step == 4 and res.step == 12


def test_target_loss_stops_at_the_first_evaluation_that_reaches_it(tmp_path):
    model, train, val = _setup()

    class ValFalls(LanguageModeling):
        calls = 0

        def evaluate(self, m, batches):
            ValFalls.calls += 1  # train then val at each evaluation: val is 3.0, 2.0, 1.0, ...
            return {"loss": 4.0 - ValFalls.calls // 2}

    lines = []
    res = train_loop(model, train, val, _cfg(max_steps=40, target_loss=2.0), tmp_path, task=ValFalls(),
                     progress=False, echo=lines.append)
    assert res.stopped_because == "target_loss"
    assert res.step == 8 and [r["val_loss"] for r in res.records] == [3.0, 2.0]  # evaluations at steps 4 and 8
    assert (tmp_path / "model" / "config.json").exists() and latest_checkpoint(tmp_path).name == "step-000008"
    assert any("reached the target: val loss 2.0000 <= 2 at step 8" in ln for ln in lines)


def test_target_loss_needs_validation_data_and_a_finite_value(tmp_path):
    model, train, _ = _setup()
    with pytest.raises(GptlabError, match="target_loss=2 stops at a validation loss, but this run has no validation"):
        train_loop(model, train, None, _cfg(target_loss=2.0), tmp_path, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(GptlabError, match=f"target_loss={bad} must be a finite validation loss > 0"):
            _cfg(target_loss=bad).validate()


def test_gradient_accumulation_matches_big_batch(tmp_path):
    # Without dropout, 2 micro-batches of 2 == 1 batch of 4 (same windows, same order).
    m1, _, _ = _setup(drop=0.0)
    m2, _, _ = _setup(drop=0.0)
    tokens = np.arange(2000) % 50
    t4 = window_batches(tokens, 16, 16, batch_size=4, seed=3, shuffle=False)
    t2 = window_batches(tokens, 16, 16, batch_size=2, seed=3, shuffle=False)
    train_loop(m1, t4, None, _cfg(max_steps=3, eval_every=3), tmp_path / "a", progress=False)
    train_loop(m2, t2, None, _cfg(max_steps=3, eval_every=3, grad_accum=2), tmp_path / "b", progress=False)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), k


def test_bad_settings_are_clear():
    with pytest.raises(GptlabError, match="how long to train"):
        TrainConfig().validate()
    with pytest.raises(GptlabError, match="batch_size=0"):
        TrainConfig(max_steps=1, batch_size=0).validate()
    for bad, msg in [(dict(epochs=0), "epochs=0 must be > 0"), (dict(max_time=0), "max_time=0 must be > 0"),
                     (dict(max_time=-1.5), "max_time=-1.5 must be > 0"), (dict(patience=0), "patience=0 must be >= 1"),
                     (dict(warmup_steps=-1), "warmup_steps=-1 must be >= 0"),
                     (dict(grad_clip=-1.0), r"grad_clip=-1.0 must be >= 0 \(0 or None turns clipping off\)"),
                     (dict(lr=1e-3, min_lr=0.01), "min_lr=0.01 must be between 0 and lr=0.001")]:
        with pytest.raises(GptlabError, match=msg):
            TrainConfig(**{"max_steps": 1, **bad}).validate()
    TrainConfig(max_steps=1, lr=1e-3, min_lr=1e-3, warmup_steps=0).validate()  # a flat schedule is fine
    TrainConfig(max_steps=1, grad_clip=0.0).validate()  # clipping off, as its message says
    with pytest.raises(GptlabError, match="has 10 tokens but one window needs 17"):
        window_batches(np.arange(10), 16, 16, 2)


def test_loss_png_is_redrawn_at_most_every_plot_interval_and_for_the_last_evaluation(tmp_path, monkeypatch):
    import gptlab.training.hooks as hooks

    drawn = []
    real = hooks.plot_losses
    monkeypatch.setattr(hooks, "plot_losses", lambda records, *a: drawn.append(records[-1]["step"]) or real(records, *a))
    monkeypatch.setattr(hooks, "PLOT_EVERY_S", 1e9)  # no interval passes within the run
    model, train, val = _setup()
    train_loop(model, train, val, _cfg(), tmp_path, progress=False)
    assert drawn == [12]  # only the last evaluation (4 and 8 fall inside the interval): it shows every point
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    drawn.clear()
    monkeypatch.setattr(hooks, "PLOT_EVERY_S", 0.0)
    train_loop(model, train, val, _cfg(), tmp_path / "every", progress=False)
    assert drawn == [4, 8, 12]
