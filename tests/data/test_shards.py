"""Sharded preparation: worker processes give the same shards as one process, the ids are the documents'
ids, an interrupted run resumes without redoing shards, other settings are refused, the reader reads
windows across shards, and memory stays bounded."""

import importlib.util
import json
import tracemalloc

import numpy as np
import pytest

from gptlab.cli import run
from gptlab.data import load_prepared, prepare_sharded
from gptlab.data.sources import Piece, iter_documents, plan_shards
from gptlab.errors import GptlabError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data):
    """tinyshakespeare as 30 .txt files, one 200 KB .txt file (split into shards) and a JSONL file."""
    root = tmp_path_factory.mktemp("corpus")
    text = (shared_data / "tinyshakespeare.txt").read_text()
    for i in range(30):
        (root / f"a{i:02d}.txt").write_text(text[i * 5000:(i + 1) * 5000])
    (root / "big.txt").write_text(text[200_000:400_000])
    with open(root / "sub.jsonl", "w") as f:
        for i in range(50):
            f.write(json.dumps({"text": text[500_000 + i * 900:500_000 + (i + 1) * 900]}) + "\n")
    return root


def _docs(root, shard_bytes):
    from gptlab.data.sources import list_sources

    return [t for shard in plan_shards(list_sources(root), shard_bytes) for p in shard
            for t in iter_documents(p, str(root))]


def test_the_plan_splits_big_files_at_line_ends_and_loses_nothing(corpus):
    docs = _docs(corpus, 60_000)
    big = "".join(t for name, t in docs if name.startswith("big.txt@"))
    assert big == (corpus / "big.txt").read_text()
    assert sum(name.startswith("big.txt@") for name, _ in docs) == 4  # 200 KB in 60 KB ranges
    lines = [t for name, t in docs if name.startswith("sub.jsonl@")]
    assert len(lines) == 50


def test_jsonl_ranges_cover_every_line_once(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i} " * (i % 7 + 1)}) + "\n" for i in range(200)))
    size = path.stat().st_size
    for step in (1, 37, 500, size):
        got = [t for s in range(0, size, step)
               for _, t in iter_documents(Piece(str(path), "jsonl", s, min(size, s + step), whole=False))]
        assert got == [f"line {i} " * (i % 7 + 1) for i in range(200)], step


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, corpus, gpt2_tok, shared_data):
    out = tmp_path_factory.mktemp("p") / "w2"
    idx = prepare_sharded(corpus, out, tokenizer=str(shared_data / "gpt2"), workers=2, shard_bytes=60_000,
                          progress=False)
    return out, idx


def test_workers_write_what_one_process_writes(tmp_path, corpus, two_workers, shared_data):
    out2, idx2 = two_workers
    idx1 = prepare_sharded(corpus, tmp_path / "w1", tokenizer=str(shared_data / "gpt2"), workers=1,
                           shard_bytes=60_000, progress=False)
    assert idx1["complete"] and idx2["complete"] and len(idx1["shards"]) >= 6
    assert [e["tokens"] for e in idx1["shards"]] == [e["tokens"] for e in idx2["shards"]]
    for e in idx1["shards"]:
        assert (tmp_path / "w1" / e["file"]).read_bytes() == (out2 / e["file"]).read_bytes()


def test_each_document_is_its_ids_then_eos(corpus, two_workers, gpt2_tok):
    out, idx = two_workers
    docs = _docs(corpus, 60_000)
    got = []
    for e in idx["shards"]:
        ids = np.fromfile(out / e["file"], dtype=idx["dtype"])
        starts = np.load(out / e["file"].replace(".bin", ".docs.npy"))
        got += [ids[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]
        assert e["documents"] == len(starts) - 1 and e["train_tokens"] + e["val_tokens"] == e["tokens"]
    assert len(got) == len(docs)
    for (_, text), ids in zip(docs, got):
        assert ids == gpt2_tok.encode(text) + [gpt2_tok.eos_id]


def test_the_reader_gathers_across_shards(two_workers):
    out, idx = two_workers
    data = load_prepared(out)
    whole = np.concatenate([np.fromfile(out / e["file"], dtype=idx["dtype"])[:e["train_tokens"]]
                            for e in idx["shards"]])
    assert len(data.train) == len(whole) == idx["train_tokens"]
    starts = np.array([0, 5, len(whole) - 11, idx["shards"][0]["train_tokens"] - 3])
    windows = data.train[starts[:, None] + np.arange(11)]  # (4, 11), one window straddles a shard boundary
    assert (windows == whole[starts[:, None] + np.arange(11)]).all()
    assert (data.train[100:200] == whole[100:200]).all() and data.train[-1] == whole[-1]
    from gptlab.training.batches import RandomWindows

    x, y = RandomWindows(data.train, 16, 4, seed=1).batch(3)
    assert x.shape == (4, 16) and (x[:, 1:] == y[:, :-1]).all()


def test_an_interrupted_run_resumes_without_redoing_shards(tmp_path, corpus, two_workers, shared_data):
    out = tmp_path / "r"
    gpt2 = str(shared_data / "gpt2")
    part = prepare_sharded(corpus, out, tokenizer=gpt2, workers=1, shard_bytes=60_000, max_shards=2, progress=False)
    assert not part["complete"] and sum(e is not None for e in part["shards"]) == 2
    with pytest.raises(GptlabError, match="unfinished"):
        load_prepared(out)
    first = out / part["shards"][0]["file"]
    stamp = first.stat().st_mtime_ns
    (out / ".shard-00003.bin.abc.tmp").write_bytes(b"half a shard")  # what a killed worker leaves
    full = prepare_sharded(corpus, out, tokenizer=gpt2, workers=2, shard_bytes=60_000, progress=False)
    assert full["complete"] and first.stat().st_mtime_ns == stamp
    assert not list(out.glob(".*.tmp"))
    ref, _ = two_workers
    for e in full["shards"]:
        assert (out / e["file"]).read_bytes() == (ref / e["file"]).read_bytes()


def test_other_settings_on_the_same_out_are_refused(corpus, two_workers, shared_data):
    out, _ = two_workers
    with pytest.raises(GptlabError, match="shard_bytes changed"):
        prepare_sharded(corpus, out, tokenizer=str(shared_data / "gpt2"), workers=1, shard_bytes=70_000,
                        progress=False)


def test_cli_and_training_on_shards(tmp_path, corpus, capsys):
    out = tmp_path / "cli"
    assert run(["prepare", "--data", str(corpus), "--out", str(out), "--workers", "2", "--shard-mb", "0.1",
                "--vocab-size", "300", "--sample-chars", "50000", "--progress", "false"]) == 0
    assert "shards," in capsys.readouterr().out
    assert run(["train", "--data", str(out), "--out", str(tmp_path / "run"), "--preset", "gpt2-nano",
                "--context-length", "32", "--batch-size", "2", "--max-steps", "2", "--eval-every", "2",
                "--eval-iters", "1", "--precision", "fp32", "--progress", "false"]) == 0
    assert (tmp_path / "run" / "model" / "config.json").is_file()


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed")
def test_parquet_rows_are_documents(tmp_path, gpt2_tok, shared_data):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i}: " + "to be or not to be " * (i % 5 + 1) for i in range(300)]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"text": texts, "id": list(range(300))}), tmp_path / "pq" / "part-0.parquet",
                   row_group_size=64)
    idx = prepare_sharded(tmp_path / "pq", tmp_path / "o", tokenizer=str(shared_data / "gpt2"), progress=False)
    ids = np.fromfile(tmp_path / "o" / idx["shards"][0]["file"], dtype=idx["dtype"]).tolist()
    assert ids == [t for s in texts for t in gpt2_tok.encode(s) + [gpt2_tok.eos_id]]


def test_memory_is_bounded_whatever_the_corpus_size(tmp_path):
    from gptlab.tokenizers import CharTokenizer

    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"])
    peaks = []
    for n_docs in (1000, 4000):
        d = tmp_path / f"c{n_docs}"
        d.mkdir()
        with open(d / "docs.jsonl", "w") as f:
            for _ in range(n_docs):
                f.write(json.dumps({"text": " ".join(rng.choice(words, 150))}) + "\n")
        tok = CharTokenizer(sorted(set(" ".join(words))))
        tok_dir = tmp_path / f"tok{n_docs}"
        tok.save(tok_dir)
        tracemalloc.start()
        prepare_sharded(d, tmp_path / f"o{n_docs}", tokenizer=str(tok_dir), shard_bytes=200_000, progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    size = (d / "docs.jsonl").stat().st_size
    assert size > 3_000_000
    # the peak is a shard's document offsets and the index (~100 KB here), not the corpus: 4x the corpus
    # adds shards to the index but keeps the peak a small fraction of the text
    assert max(peaks) < 0.1 * size and peaks[1] < 2 * peaks[0], peaks


def test_a_killed_prepare_resumes_to_the_same_shards(tmp_path, corpus, shared_data):
    """SIGKILL the whole process group (main process and workers) mid-run; rerunning finishes it, identically."""
    import os
    import signal
    import subprocess
    import sys
    import time

    argv = [sys.executable, "-c", "import sys; from gptlab.cli import main; sys.exit(main())", "prepare",
            "--data", str(corpus), "--tokenizer", str(shared_data / "gpt2"), "--workers", "2",
            "--shard-mb", "0.02", "--progress", "false"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), OMP_NUM_THREADS="1")
    ref = tmp_path / "ref"
    subprocess.run([*argv, "--out", str(ref)], env=env, check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([*argv, "--out", str(out)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            done = sum(e is not None for e in json.loads((out / "index.json").read_text())["shards"])
        except (OSError, ValueError):
            done = 0
        if done >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    index = json.loads((out / "index.json").read_text())  # written atomically: always whole
    assert not index["complete"], "the run finished before it could be killed; nothing was tested"
    subprocess.run([*argv, "--out", str(out)], env=env, check=True, capture_output=True)
    final, want = json.loads((out / "index.json").read_text()), json.loads((ref / "index.json").read_text())
    assert final["complete"] and [e["tokens"] for e in final["shards"]] == [e["tokens"] for e in want["shards"]]
    for e in want["shards"]:
        assert (out / e["file"]).read_bytes() == (ref / e["file"]).read_bytes()
