"""The run directory: --overwrite validates first and replaces by rename, the writer's lock, resume rules."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from paths import SHARED

from gptlab.cli import run
from gptlab.errors import GptlabError
from gptlab.training.rundir import RunDir, lock_run

VERDICT = Path(SHARED) / "the-verdict.txt"
pytestmark = pytest.mark.skipif(not VERDICT.exists(), reason="shared/data/the-verdict.txt not found")

TINY = ["--preset", "gpt2-nano", "--context-length", "32", "--vocab-size", "300", "--batch-size", "4",
        "--eval-every", "5", "--eval-iters", "2", "--precision", "fp32", "--progress", "false"]


def _hash(run_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(run_dir.rglob("*")):
        h.update(str(p.relative_to(run_dir)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "verdict"
    assert run(["train", "--data", str(VERDICT), "--out", str(out), "--max-steps", "5", *TINY]) == 0
    return out


@pytest.mark.parametrize("bad,msg", [
    (["--data", "no-such-corpus.txt"], "not found"),
    (["--preset", "gpt2-nope"], "gpt2-nope"),
    (["--device", "tpu"], "tpu"),
    (["--tokenizer", "no/such/tokenizer.json"], "tokenizer"),
])
def test_a_typo_with_overwrite_leaves_the_old_run_byte_identical(trained, capsys, bad, msg):
    before = _hash(trained)
    argv = ["train", "--data", str(VERDICT), "--out", str(trained), "--max-steps", "2", *TINY, "--overwrite", *bad]
    assert run(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err, err
    assert _hash(trained) == before
    assert not list(trained.parent.glob(f".{trained.name}.*"))  # no staging directory left behind


def test_overwrite_replaces_the_run_by_rename(tmp_path, capsys):
    out = tmp_path / "r"
    assert run(["train", "--data", str(VERDICT), "--out", str(out), "--max-steps", "5", *TINY]) == 0
    (out / "stale.txt").write_text("from the old run")
    assert run(["train", "--data", str(VERDICT), "--out", str(out), "--max-steps", "5", *TINY, "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_a_second_writer_is_refused_naming_the_first_pid(tmp_path, capsys):
    out = tmp_path / "locked"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from gptlab.training.rundir import lock_run; "
        f"lock_run(Path({str(out)!r})); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(Path(__file__).parents[2] / "src")})
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = run(["train", "--data", str(VERDICT), "--out", str(out), "--max-steps", "2", *TINY])
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1
        assert f"being written by another gptlab process (pid {holder.pid})" in err, err
        assert not (out / "model").exists()
    finally:
        holder.kill()
        holder.wait()
    fd = lock_run(out)  # the kernel released the killed process's lock
    import os

    os.close(fd)


def test_the_lock_refuses_a_second_descriptor(tmp_path):
    import os

    fd = lock_run(tmp_path)
    try:
        with pytest.raises(GptlabError, match=f"pid {os.getpid()}"):
            lock_run(tmp_path)
    finally:
        os.close(fd)


@pytest.mark.parametrize("flags,msg", [
    (["--lr", "0.01"], "--lr 0.01 differs from the 0.001"),
    (["--batch-size", "2"], "--batch-size 2 differs from the 4"),
    (["--batch-size", "8"], "--batch-size 8 differs from the 4"),  # the default, given: still a change
    (["--mlp-act", "gelu"], "--mlp-act gelu differs from the default (not set) that"),
    (["--preset", "gpt2-micro"], "--preset gpt2-micro differs from the 'gpt2-nano'"),
    (["--data", "tinyshakespeare"], "--data tinyshakespeare differs from the"),
    (["--max-steps", "5"], "is already at step 5 (epoch 0.05); give a larger --max-steps/--epochs to continue"),
    (["--max-steps", "3"], "is already at step 5 (epoch 0.05); give a larger"),
    ([], "is already at step 5 (epoch 0.05); give a larger"),
])
def test_train_resume_refuses_changed_settings_and_a_reached_limit(trained, capsys, flags, msg):
    before = _hash(trained)
    assert run(["train", "--resume", str(trained), "--progress", "false", *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err, err
    assert _hash(trained) == before


def test_resume_refuses_a_default_given_through_the_api_or_a_config_file(trained, tmp_path, capsys):
    import gptlab

    before = _hash(trained)
    with pytest.raises(GptlabError, match="--batch-size 8 differs from the 4"):
        gptlab.train(resume=str(trained), batch_size=8, max_steps=10, progress=False)
    config = tmp_path / "more.yaml"
    config.write_text("batch_size: 8\nmax_steps: 10\n")
    assert run(["train", "--resume", str(trained), "--config", str(config), "--progress", "false"]) == 1
    assert "--batch-size 8 differs from the 4" in capsys.readouterr().err
    assert _hash(trained) == before


def test_resume_without_the_latest_pointer_uses_the_newest_complete_checkpoint(trained, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    (copy / "checkpoints" / "latest").unlink()
    assert RunDir(copy, "train_config.yaml").latest_checkpoint().name == "step-000005"
    assert run(["train", "--resume", str(copy), "--max-steps", "10", "--progress", "false"]) == 0
    assert "from step-000005" in capsys.readouterr().out


def test_library_defaults_are_the_commands(tmp_path):
    import torch

    from gptlab.training.commands import PretrainSettings, Pretraining

    s = PretrainSettings()
    cfg = Pretraining().train_config(s, torch.device("cpu"))
    assert (cfg.lr, cfg.max_steps) == (1e-3, 300)


def test_resume_cleans_stale_temp_files_and_truncates_samples(trained, tmp_path, capsys):
    """A run killed mid-write leaves .NAME.XXXX.tmp files, and samples.txt holds sections past the checkpoint
    it resumes from; resuming removed neither, so samples.txt repeated steps (issue 16)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    stale = [copy / ".metrics.jsonl.abc123.tmp", copy / "checkpoints" / "step-000005" / ".model.safetensors.x.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    with open(copy / "samples.txt", "a") as f:  # what a run killed after step 8's evaluation had written
        f.write("--- step 8 ---\nwritten after the checkpoint\n")
    assert run(["train", "--resume", str(copy), "--max-steps", "10", "--progress", "false"]) == 0
    assert not any(p.exists() for p in stale)
    steps = [l for l in (copy / "samples.txt").read_text().splitlines() if l.startswith("--- step")]
    assert steps == ["--- step 5 ---", "--- step 10 ---"]


def test_ctrl_c_before_the_new_runs_first_checkpoint_gives_the_old_run_back(trained, tmp_path, capsys, monkeypatch):
    """--overwrite moved the old run away, then Ctrl-C came before the new run's first checkpoint: the old run
    was gone and nothing was left to resume (found trying the CLI as a new user)."""
    import shutil

    import gptlab.training.driver as driver

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    before = _hash(copy)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "train_loop", interrupted)
    argv = ["train", "--data", str(VERDICT), "--out", str(copy), "--overwrite", "--max-steps", "2", *TINY]
    assert run(argv) == 130
    assert _hash(copy) == before and not list(tmp_path.glob(".copy.*"))

    def checkpoint_then_fail(*args, on_checkpoint=None, **kwargs):
        (Path(args[4]) / "checkpoints").mkdir()
        on_checkpoint()  # the new run has its first checkpoint: the old one may go
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "train_loop", checkpoint_then_fail)
    assert run(argv) == 130
    assert _hash(copy) != before and not list(tmp_path.glob(".copy.*"))  # the new run stays, the old is gone


def test_a_resumed_run_records_its_new_limit_for_the_next_resume(trained, tmp_path, capsys):
    """--resume --max-steps 10 writes 10 into train_config.yaml: resumed again without the flag (after a crash
    that lost the step-10 checkpoint, say) the run goes on to 10 instead of being refused at its first limit."""
    import shutil

    import yaml

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    config = copy / "train_config.yaml"
    assert yaml.safe_load(config.read_text())["train"]["max_steps"] == 5
    assert run(["train", "--resume", str(copy), "--max-steps", "10", "--progress", "false"]) == 0
    recorded = yaml.safe_load(config.read_text())
    assert recorded["train"]["max_steps"] == 10 and recorded["train"]["epochs"] is None
    assert recorded["settings"] == yaml.safe_load((trained / "train_config.yaml").read_text())["settings"]
    capsys.readouterr()
    # the crash: the step-10 checkpoint is gone, step 5 is the newest complete one
    shutil.rmtree(copy / "checkpoints" / "step-000010")
    (copy / "checkpoints" / "latest").unlink()
    assert run(["train", "--resume", str(copy), "--progress", "false"]) == 0
    assert "from step-000005" in capsys.readouterr().out
    assert RunDir(copy, "train_config.yaml").checkpoint_step() == 10
