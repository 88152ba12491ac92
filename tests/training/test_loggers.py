"""--logger csv|tensorboard|wandb: the evaluation records reach each logger, read back from its files."""

from __future__ import annotations

import csv
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest
from paths import SHARED

from gptlab.cli import run
from gptlab.errors import GptlabError
from gptlab.training import loggers
from gptlab.training.loggers import open_loggers, scalar_tag

VERDICT = Path(SHARED) / "the-verdict.txt"
pytestmark = pytest.mark.skipif(not VERDICT.exists(), reason="shared/data/the-verdict.txt not found")

TINY = ["--preset", "gpt2-nano", "--context-length", "32", "--vocab-size", "300", "--batch-size", "4",
        "--eval-every", "5", "--eval-iters", "2", "--precision", "fp32", "--progress", "false", "--device", "cpu"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in RUN/tensorboard, read back with TensorBoard's own EventAccumulator."""
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea_mod.EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    pytest.importorskip("torch.utils.tensorboard")
    out = tmp_path_factory.mktemp("runs") / "logged"
    assert run(["train", "--data", str(VERDICT), "--out", str(out), "--max-steps", "10",
                "--logger", "tensorboard", "--logger", "csv", *TINY]) == 0
    return out


def test_tensorboard_events_hold_the_losses(logged):
    recs, scalars = _metrics(logged), _scalars(logged)
    assert {"train/loss", "val/loss", "train/perplexity", "lr", "tokens_per_s"} <= set(scalars)
    for tag, key in (("train/loss", "train_loss"), ("val/loss", "val_loss"), ("lr", "lr")):
        assert [s for s, _ in scalars[tag]] == [5, 10]
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in recs], rel=1e-6)  # stored as float32
    assert scalars["train/loss"][1][1] < scalars["train/loss"][0][1]  # it learned something in 10 steps


def test_csv_rows_match_metrics_jsonl(logged):
    with open(logged / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    recs = _metrics(logged)
    assert [int(r["step"]) for r in rows] == [r["step"] for r in recs] == [5, 10]
    assert [float(r["val_loss"]) for r in rows] == [r["val_loss"] for r in recs]  # repr round-trips exactly


def test_resume_appends_to_the_same_logs(logged):
    assert run(["train", "--resume", str(logged), "--max-steps", "15", "--progress", "false",
                "--logger", "tensorboard,csv"]) == 0
    scalars = _scalars(logged)
    assert [s for s, _ in scalars["train/loss"]] == [5, 10, 15]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["train_loss"] for r in _metrics(logged)],
                                                                  rel=1e-6)
    with open(logged / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [5, 10, 15]


def test_finetuning_recipe_logs_its_accuracy(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    sms = Path(SHARED) / "SMSSpamCollection.tsv"
    if not sms.is_file():
        pytest.skip(f"{sms} not present")
    base = tmp_path / "base"
    assert run(["train", "--data", str(VERDICT), "--out", str(base), "--max-steps", "2", *TINY]) == 0
    out = tmp_path / "cls"
    assert run(["finetune", "classify", "--model", str(base), "--data", str(sms), "--out", str(out),
                "--limit", "40", "--max-length", "16", "--epochs", "2", "--eval-iters", "1",
                "--batch-size", "4", "--precision", "fp32", "--device", "cpu", "--progress", "false",
                "--logger", "tensorboard"]) == 0
    scalars, recs = _scalars(out), _metrics(out)
    assert [s for s, _ in scalars["val/accuracy"]] == [r["step"] for r in recs] and len(recs) == 2  # per epoch
    assert [v for _, v in scalars["val/accuracy"]] == pytest.approx([r["val_accuracy"] for r in recs], rel=1e-6)


class _FakeWandb(types.ModuleType):
    """Records what gptlab asks of wandb (the package is not installed here, and must not be required)."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.util = types.SimpleNamespace(generate_id=lambda: "abc123")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kw):
        self.inits.append(kw)
        fake = self

        class Run:
            def log(self, data, step):
                fake.logged.append((step, data))

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_runs_offline_without_a_key(tmp_path, monkeypatch):
    from gptlab.training import train

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no key
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    out = tmp_path / "w"
    train(data=str(VERDICT), out=str(out), max_steps=5, preset="gpt2-nano", context_length=32, vocab_size=300,
          batch_size=4, eval_every=5, eval_iters=2, precision="fp32", progress=False, device="cpu", logger=["wandb"])
    (init,) = fake.inits
    assert init["mode"] == "offline" and init["dir"] == str(out) and init["id"] == "abc123"
    assert init["config"]["max_steps"] == 5 and (out / "wandb-id").read_text().strip() == "abc123"
    ((step, data),) = fake.logged
    assert step == 5 and data["train/loss"] == _metrics(out)[0]["train_loss"] and fake.finished == 1


def test_missing_package_is_refused_before_the_run_exists(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(loggers._NEEDS, "wandb", ("gptlab_no_such_package", "pip install wandb"))
    out = tmp_path / "never"
    assert run(["train", "--data", str(VERDICT), "--out", str(out), "--max-steps", "2", "--logger", "wandb", *TINY]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --logger wandb needs the gptlab_no_such_package package: pip install wandb")
    assert not out.exists()
    assert run(["train", "--data", str(VERDICT), "--out", str(out), "--logger", "mlflow", *TINY]) == 2
    assert "--logger" in capsys.readouterr().err


def test_only_the_main_rank_logs_and_tags(tmp_path):
    assert open_loggers(["csv", "tensorboard"], tmp_path, [], None, {}, is_main=False) == []
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(GptlabError, match="'mlflow' is not a logger; choose from csv, tensorboard, wandb"):
        open_loggers(["mlflow"], tmp_path, [], None, {})
    assert [scalar_tag(k) for k in ("train_loss", "val_accuracy", "lr", "tokens_per_s")] == \
        ["train/loss", "val/accuracy", "lr", "tokens_per_s"]
