"""`gptlab train` end to end: run directory, resume, generate, eval, and every bad input."""

import json
from pathlib import Path

import pytest
from paths import SHARED

from gptlab.cli import run
from gptlab.training import TrainConfig, train

VERDICT = Path(SHARED) / "the-verdict.txt"
pytestmark = pytest.mark.skipif(not VERDICT.exists(), reason="shared/data/the-verdict.txt not found")

TINY = ["--preset", "gpt2-nano", "--context-length", "32", "--vocab-size", "300", "--batch-size", "4",
        "--eval-every", "5", "--eval-iters", "2", "--precision", "fp32", "--progress", "false"]


def _metrics(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "verdict"
    assert run(["train", "--data", str(VERDICT), "--out", str(out), "--max-steps", "10", *TINY]) == 0
    return out


def test_train_writes_a_complete_run(trained):
    for name in ("train_config.yaml", "metrics.jsonl", "loss.png", "samples.txt", "model/model.safetensors",
                 "model/config.json", "checkpoints/latest"):
        assert (trained / name).exists(), name
    assert [r["step"] for r in _metrics(trained)] == [5, 10]


def test_resume_continues_where_it_stopped(trained, capsys):
    assert run(["train", "--resume", str(trained), "--max-steps", "15", "--progress", "false"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert [r["step"] for r in _metrics(trained)] == [5, 10, 15]


def test_generate_and_eval_from_the_run(trained, capsys):
    assert run(["generate", "--model", str(trained), "--prompt", "I HAD always", "--max-new-tokens", "8",
                "--seed", "1", "--stream", "false"]) == 0
    assert capsys.readouterr().out.startswith("I HAD always")
    assert run(["eval", str(trained), "--data", str(VERDICT), "--as-json", "true"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["tokens"] > 1000 and r["perplexity"] > 1


def _err(capsys, argv):
    code = run(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_existing_run_is_not_overwritten(trained, capsys):
    before = (trained / "model" / "model.safetensors").read_bytes()
    code, err = _err(capsys, ["train", "--data", str(VERDICT), "--out", str(trained), "--max-steps", "2", *TINY])
    assert code == 1 and "already holds a run" in err and "--resume" in err
    assert (trained / "model" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("content,msg", [
    (None, "not found"),
    ("", "empty"),
    ("too short to train on", "one window needs 33"),
])
def test_bad_corpora(tmp_path, capsys, content, msg):
    f = tmp_path / "corpus.txt"
    if content is not None:
        f.write_text(content)
    code, err = _err(capsys, ["train", "--data", str(f), "--out", str(tmp_path / "r"), "--max-steps", "2",
                              "--tokenizer", "char", *TINY])
    assert code == 1 and err.startswith("error:") and msg in err and len(err.splitlines()) == 1


def test_corrupt_and_truncated_checkpoints(trained, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained / "model", bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])
    code, err = _err(capsys, ["generate", "--model", str(bad), "--prompt", "x"])
    assert code == 1 and "corrupt or truncated" in err
    w.write_bytes(b"\x00" * 64)
    code, err = _err(capsys, ["generate", "--model", str(bad), "--prompt", "x"])
    assert code == 1 and "corrupt or truncated" in err

    run_copy = tmp_path / "run"
    shutil.copytree(trained, run_copy)
    ck = run_copy / "checkpoints" / (run_copy / "checkpoints" / "latest").read_text().strip()
    (ck / "state.pt").write_bytes(b"garbage")
    code, err = _err(capsys, ["train", "--resume", str(run_copy), "--max-steps", "30", "--progress", "false"])
    assert code == 1 and "state.pt is corrupt or truncated" in err


def test_wrong_shapes_are_named(trained, tmp_path, capsys):
    import shutil

    bad = tmp_path / "shapes"
    shutil.copytree(trained / "model", bad)
    meta = json.loads((bad / "config.json").read_text())
    meta["model"]["emb_dim"] = 32
    meta["model"]["head_dim"] = None
    meta["model"]["hidden_dim"] = None
    (bad / "config.json").write_text(json.dumps(meta))
    code, err = _err(capsys, ["generate", "--model", str(bad), "--prompt", "x"])
    assert code == 1 and "wrong shapes" in err and "tok_emb.weight" in err


def test_verdict_train_loss_below_one(tmp_path):
    """A small model memorises the-verdict: training loss < 1.0 within 300 steps on CPU."""
    cfg = TrainConfig(max_steps=300, batch_size=16, lr=3e-3, warmup_steps=20, eval_every=50, eval_iters=4,
                      precision="fp32", weight_decay=0.0, seed=1)
    res = train(str(VERDICT), preset="gpt2-micro", out=tmp_path / "mem", vocab_size=512, context_length=64,
                n_layers=2, emb_dim=128, n_heads=4, dropout=0.0, stride=16, progress=False, train_cfg=cfg)
    losses = [r["train_loss"] for r in res.records]
    assert losses[-1] < 1.0, losses


def test_train_on_prepared_memmaps(tmp_path, capsys):
    prepared = tmp_path / "prep"
    assert run(["prepare", "--data", str(VERDICT), "--out", str(prepared), "--vocab-size", "300",
                "--progress", "false"]) == 0
    out = tmp_path / "run"
    assert run(["train", "--data", str(prepared), "--out", str(out), "--max-steps", "5", *TINY]) == 0
    assert [r["step"] for r in _metrics(out)] == [5]
    # the run's tokenizer is the prepared one
    assert (out / "model" / "gptlab_tokenizer.json").exists()


def test_yaml_config_with_command_line_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {VERDICT}\nmax_steps: 50\nbatch_size: 4\npreset: gpt2-nano\ncontext_length: 32\n"
                   "vocab_size: 300\neval_every: 5\neval_iters: 2\nprecision: fp32\nprogress: false\n")
    out = tmp_path / "r"
    assert run(["train", "--config", str(cfg), "--max-steps", "5", "--beta1", "0.7", "--out", str(out)]) == 0
    import torch
    import yaml

    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["train"]["max_steps"] == 5 and saved["train"]["batch_size"] == 4
    assert (saved["train"]["beta1"], saved["train"]["beta2"]) == (0.7, 0.95)
    from gptlab.training.checkpoint import latest_checkpoint

    state = torch.load(latest_checkpoint(out) / "state.pt", weights_only=False)
    assert {tuple(g["betas"]) for g in state["optimizer"]["param_groups"]} == {(0.7, 0.95)}  # what AdamW ran with
    assert saved["model"]["context_length"] == 32


def test_time_limit_before_the_first_step_claims_no_files(tmp_path, capsys, monkeypatch):
    import gptlab.training.loop as loop

    class Clock:  # every reading is a second later: the limit has passed before the first step
        now = 0.0

        def perf_counter(self):
            Clock.now += 1.0
            return Clock.now

    monkeypatch.setattr(loop, "time", Clock())
    out = tmp_path / "run"
    assert run(["train", "--data", str(VERDICT), "--out", str(out), "--max-time", "0.5", *TINY]) == 0
    text = capsys.readouterr().out
    assert "stopped (max_time) at step 0" in text and "nothing trained" in text
    assert "metrics.jsonl" not in text and "gptlab generate" not in text
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("flags,msg", [
    (["--epochs", "0"], "--epochs 0 must be > 0"),
    (["--max-time", "0"], "--max-time 0 must be > 0 seconds"),
    (["--max-time", "-5"], "--max-time -5 must be > 0 seconds"),
    (["--patience", "0"], "--patience 0 must be >= 1"),
    (["--warmup-steps", "-1"], "--warmup-steps -1 must be >= 0"),
    (["--beta1", "1"], "--beta1 1.0 must be in [0, 1)"),
    (["--target-loss", "-1"], "--target-loss -1.0 must be a finite validation loss > 0"),
    (["--val-ratio", "0.001", "--target-loss", "4.9"], "--target-loss 4.9 stops at a validation loss, but this run has no"),
    (["--beta2", "-0.1"], "--beta2 -0.1 must be in [0, 1)"),
    (["--lr", "0.001", "--min-lr", "0.01"], "--min-lr 0.01 must be between 0 and --lr 0.001"),
])
def test_bad_limits_are_refused_before_any_work(tmp_path, capsys, flags, msg):
    out = tmp_path / "run"
    assert run(["train", "--data", str(VERDICT), "--out", str(out), *flags, *TINY]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {msg}") and err.count("\n") == 1
    assert not out.exists()


def test_target_loss_stops_the_run_where_it_is_reached(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", "--data", str(VERDICT), "--out", str(out), "--max-steps", "50", "--target-loss", "100",
                *TINY]) == 0  # any first evaluation is below a loss of 100
    text = capsys.readouterr().out
    assert "reached the target: val loss" in text and "stopped (target_loss) at step 5" in text
    assert [r["step"] for r in _metrics(out)] == [5] and (out / "model" / "config.json").exists()
    assert run(["train", "--data", str(VERDICT), "--out", str(tmp_path / "nan"), "--target-loss", "nan", *TINY]) == 2
    assert "--target-loss expects a number, got 'nan'" in capsys.readouterr().err


def test_resuming_a_run_at_its_target_is_refused_and_a_lower_target_trains_on(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", "--data", str(VERDICT), "--out", str(out), "--max-steps", "50", "--target-loss", "100",
                *TINY]) == 0
    capsys.readouterr()
    saved = (out / "train_config.yaml").read_text()
    assert run(["train", "--resume", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} already reached its target loss 100 (val loss ") and "at step 5)" in err
    assert "give a lower --target-loss to train on" in err and (out / "train_config.yaml").read_text() == saved
    assert run(["train", "--resume", str(out), "--target-loss", "0.01", "--max-steps", "10"]) == 0
    text = capsys.readouterr().out
    assert "stopped (max_steps) at step 10" in text
    assert "target loss 0.01 not reached (best val loss " in text and f"--resume {out}" in text
    assert [r["step"] for r in _metrics(out)] == [5, 10]


def test_a_target_on_resume_without_validation_data_leaves_the_run_as_it_was(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", "--data", str(VERDICT), "--out", str(out), "--max-steps", "5", "--val-ratio", "0.001",
                *TINY]) == 0
    saved = (out / "train_config.yaml").read_text()
    capsys.readouterr()
    assert run(["train", "--resume", str(out), "--max-steps", "10", "--target-loss", "4.9"]) == 1
    assert "--target-loss 4.9 stops at a validation loss, but this run has no" in capsys.readouterr().err
    assert (out / "train_config.yaml").read_text() == saved  # the refused limits were not recorded
    assert run(["train", "--resume", str(out), "--max-steps", "10"]) == 0


def test_bad_limit_on_resume_is_refused_before_loading(tmp_path, capsys):
    assert run(["train", "--resume", str(tmp_path / "no-run"), "--epochs", "0"]) == 1
    assert capsys.readouterr().err.startswith("error: --epochs 0 must be > 0")


def test_a_corpus_too_small_for_the_vocabulary_is_explained(capsys):
    from gptlab.training.commands import _build_tokenizer

    tok = _build_tokenizer(None, "the cat sat on the mat. " * 50, 4096, "")
    out = capsys.readouterr().out
    assert tok.vocab_size < 4096 and f"the corpus filled {tok.vocab_size:,} of the 4,096 requested tokens" in out


def test_moe_micro_trains_and_logs_its_balancing_loss(tmp_path, capsys):
    """The mixture-of-experts preset trains through the one loop: the loss falls, the aux loss is logged."""
    import math

    from gptlab.weights import load_model

    out = tmp_path / "moe"
    flags = ["--preset", "moe-micro", "--context-length", "32", "--vocab-size", "300", "--batch-size", "8",
             "--eval-every", "10", "--eval-iters", "2", "--lr", "3e-3", "--precision", "fp32", "--progress", "false"]
    assert run(["train", "--data", str(VERDICT), "--out", str(out), "--max-steps", "30", *flags]) == 0
    assert "val aux_loss" in capsys.readouterr().out
    recs = _metrics(out)
    assert [r["step"] for r in recs] == [10, 20, 30]
    assert recs[0]["train_loss"] < math.log(300)  # below the uniform guess already
    assert recs[-1]["train_loss"] < recs[0]["train_loss"] and recs[-1]["val_loss"] < recs[0]["val_loss"]
    for r in recs:  # router_aux_loss_coef 0.01 x E·sum f·P, which lies in (0, E = 4]
        assert 0.0 < r["train_aux_loss"] <= 0.04 and 0.0 < r["val_aux_loss"] <= 0.04
    model = load_model(out)
    assert (model.cfg.n_experts, model.cfg.experts_per_token, model.cfg.shared_expert_dim) == (4, 2, 256)


def test_the_eval_sample_fits_a_small_context_without_a_warning_each_evaluation(caplog):
    import logging

    import torch

    from gptlab.models import build_model, get_preset
    from gptlab.tokenizers.char import CharTokenizer
    from gptlab.training.commands import SAMPLE_TOKENS, _sampler

    tok = CharTokenizer.from_text("The quick brown fox")
    torch.manual_seed(0)
    model = build_model(get_preset("gpt2-nano").replace(vocab_size=tok.vocab_size, context_length=16))
    with caplog.at_level(logging.WARNING, logger="gptlab"):
        text = _sampler(tok, "The")(model)
    assert len(tok.encode(text)) == 16 < 3 + SAMPLE_TOKENS  # the prompt and as many new tokens as the context holds
    assert not [r for r in caplog.records if "passes the model's context" in r.getMessage()]
