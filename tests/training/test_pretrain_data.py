"""`gptlab train` on a mixture and on a stream (exact resume mid-epoch: the same losses as one run), the
default vocabulary that grows with the corpus, and the one-line warning for a corpus far too small."""

import json
from pathlib import Path

import pytest
import torch
from paths import SHARED

from gptlab.cli import run
from gptlab.training.pretrain_data import corpus_advice, default_vocab, fitting_preset

DATA = Path(SHARED)
pytestmark = pytest.mark.skipif(not (DATA / "tinyshakespeare.txt").exists(), reason="shared data not found")
TINY = ["--preset", "gpt2-nano", "--context-length", "16", "--vocab-size", "300", "--batch-size", "4",
        "--eval-every", "3", "--eval-iters", "1", "--precision", "fp32", "--progress", "false",
        "--lr", "1e-3", "--min-lr", "1e-3", "--warmup-steps", "1"]  # a schedule that does not depend on --max-steps


def _losses(run_dir):
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in
            map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())]


def test_default_vocab_grows_with_the_corpus():
    assert [default_vocab(n) for n in (20_479, 153_000, 418_000, 1_003_854, 10**8)] == [512, 2048, 4096, 8192, 32768]


def test_the_issue_example_warns_and_names_what_fits():
    # a 170 KB book, the defaults: gpt2-mini with a 4,096 vocabulary is 12.32M parameters, meeting ~40K tokens
    line = corpus_advice(40_000, 12_318_720, "gpt2-mini", 4096, train_chars=153_000)
    assert line.startswith("warning: 40,000 training tokens for 12.32M parameters (gpt2-mini, vocab 4,096)")
    assert "0.00325 tokens per parameter" in line and "--preset gpt2-nano --vocab-size 2048 (0.24M parameters)" in line
    assert "wants ~4.7M tokens" in line  # 20 x 0.236M: not even the smallest fits 40K tokens
    fits = corpus_advice(10_000_000, 12_318_720, "gpt2-mini", 4096, train_chars=40_000_000)
    assert "this corpus fits --preset gpt2-nano --vocab-size 4096 (0.37M parameters)" in fits
    assert "\n" not in line
    assert corpus_advice(300_000_000, 12_318_720, "gpt2-mini", 4096) is None  # 24 tokens/param: fine
    name, vocab, n = fitting_preset(3_000_000_000, 10**10)  # 3B tokens: gpt2-124m (111M with vocab 32768) fits
    assert name == "gpt2-124m" and vocab == 32768 and n * 20 <= 3_000_000_000


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    text = (DATA / "tinyshakespeare.txt").read_text()
    (d / "plays.txt").write_text(text[:60_000])
    (d / "code").mkdir()
    (d / "code" / "a.txt").write_text((DATA / "the-verdict.txt").read_text())
    return d


def test_mixture_training_resumes_exactly(tmp_path, sources, capsys):
    mix = ["--data", f"{sources / 'plays.txt'}:0.7", "--data", f"{sources / 'code'}:0.3"]
    assert run(["train", *mix, "--out", str(tmp_path / "full"), "--max-steps", "6", *TINY]) == 0
    out = capsys.readouterr().out
    assert "(70%)" in out and "(30%)" in out and "warning:" in out  # 0.1M params on ~25K tokens
    assert run(["train", *mix, "--out", str(tmp_path / "half"), "--max-steps", "3", *TINY]) == 0
    state = torch.load(tmp_path / "half" / "checkpoints" / "step-000003" / "state.pt", weights_only=False)
    assert state["data"]["kind"] == "mixture" and sum(state["data"]["drawn"]) == 3 * 4
    assert run(["train", "--resume", str(tmp_path / "half"), "--max-steps", "6", "--progress", "false"]) == 0
    assert _losses(tmp_path / "half") == _losses(tmp_path / "full")


def test_streamed_training_resumes_exactly(tmp_path, sources):
    text = (sources / "plays.txt").read_text()
    d = tmp_path / "jsonl"
    d.mkdir()
    with open(d / "docs.jsonl", "w") as f:
        for i in range(0, len(text), 600):
            f.write(json.dumps({"text": text[i:i + 600]}) + "\n")
    argv = ["train", "--data", str(d), "--stream", *TINY]
    assert run([*argv, "--out", str(tmp_path / "full"), "--max-steps", "6"]) == 0
    assert run([*argv, "--out", str(tmp_path / "half"), "--max-steps", "3"]) == 0
    state = torch.load(tmp_path / "half" / "checkpoints" / "step-000003" / "state.pt", weights_only=False)
    assert state["data"]["kind"] == "stream" and state["data"]["micro_step"] == 3 and state["data"]["doc"] > 0
    assert run(["train", "--resume", str(tmp_path / "half"), "--max-steps", "6", "--progress", "false"]) == 0
    assert _losses(tmp_path / "half") == _losses(tmp_path / "full")


def test_stream_and_mixture_together_are_refused(tmp_path, sources, capsys):
    code = run(["train", "--data", f"{sources / 'plays.txt'}:0.5", "--data", str(sources / "code"), "--stream",
                "--out", str(tmp_path / "r"), *TINY])
    assert code == 1 and "--stream reads one --data source" in capsys.readouterr().err
