"""Mixtures (weights kept exactly, ranks disjoint, reproducible, resumable anywhere) and streaming readers
(JSONL/Parquet tokenized on the fly, ranks disjoint, exact resume across pieces and epochs)."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from gptlab.data.mixture import MixtureBatches, block_counts, feistel_permute, is_mixture, parse_mixture
from gptlab.data.stream import StreamBatches, TokenStream
from gptlab.errors import GptlabError
from gptlab.tokenizers import CharTokenizer


def test_parse_mixture(tmp_path):
    assert parse_mixture(["a.txt:0.7", "code/:0.3"]) == [("a.txt", 0.7), ("code/", 0.3)]
    assert parse_mixture(["a.txt:2", "b.txt"]) == [("a.txt", 2 / 3), ("b.txt", 1 / 3)]
    odd = tmp_path / "x:0.5"  # a path whose name ends like a weight is a path
    odd.write_text("hi")
    assert parse_mixture([str(odd)]) == [(str(odd), 1.0)] and not is_mixture([str(odd)])
    assert is_mixture(["a.txt:0.5"]) and is_mixture(["a", "b"]) and not is_mixture("a.txt") and not is_mixture(["a"])
    with pytest.raises(GptlabError, match="must be a number > 0"):
        parse_mixture(["a.txt:0"])


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 17, 1000, 4097])
def test_feistel_is_a_permutation(n):
    p = feistel_permute(np.arange(n), n, key=12345)
    assert sorted(p.tolist()) == list(range(n))
    if n > 16:
        assert not (p == np.arange(n)).all() and not (p == feistel_permute(np.arange(n), n, key=1)).all()


def _sources():
    a = np.arange(16_000) % 1000  # ids < 1000: source a; >= 1000: source b
    b = np.arange(8_000) % 1000 + 1000
    return a, b


def test_weights_are_kept_exactly_per_block():
    a, b = _sources()
    assert block_counts([0.7, 0.3], 1024).tolist() == [717, 307]
    mix = MixtureBatches([a, b], [0.7, 0.3], 16, 8, seed=3)
    firsts = torch.cat([mix.batch(s)[0][:, 0] for s in range(256)])  # 2048 samples = 2 blocks
    assert int((firsts >= 1000).sum()) == 2 * 307
    assert mix.drawn(256) == [2 * 717, 2 * 307]


def test_ranks_read_disjoint_slices_of_the_one_process_stream():
    a, b = _sources()
    one = MixtureBatches([a, b], [0.7, 0.3], 16, 8, seed=3)
    ranks = [MixtureBatches([a, b], [0.7, 0.3], 16, 8, seed=3, rank=r, world=2) for r in range(2)]
    assert ranks[0].batch(0)[0].shape == (4, 16)
    assert torch.equal(MixtureBatches([a, b], [0.7, 0.3], 16, 8, seed=3).shard(1, 2).batch(3)[0], ranks[1].batch(3)[0])
    with pytest.raises(GptlabError, match="does not split into 3"):
        one.shard(0, 3)
    for step in (0, 1, 17, 300):
        x = torch.cat([r.batch(step)[0] for r in ranks])
        assert torch.equal(x, one.batch(step)[0])
    assert one.state_dict(40)["drawn"] == ranks[1].state_dict(40)["drawn"]


def test_reproducible_and_resumable_mid_epoch():
    a, b = _sources()
    run = MixtureBatches([a, b], [0.7, 0.3], 16, 8, seed=3)
    first = [run.batch(s) for s in range(30)]
    again = MixtureBatches([a, b], [0.7, 0.3], 16, 8, seed=3)  # a new process, resumed at step 20
    for s in range(20, 30):
        assert all(torch.equal(u, v) for u, v in zip(again.batch(s), first[s]))
    state = run.state_dict(20)
    assert sum(state["drawn"]) == 20 * 8 and 0 < state["epochs"][0] < 1
    again.check_state(state)
    other = MixtureBatches([a, b], [0.5, 0.5], 16, 8, seed=3)
    with pytest.raises(GptlabError, match="weights"):
        other.check_state(state)
    assert not torch.equal(MixtureBatches([a, b], [0.7, 0.3], 16, 8, seed=4).batch(0)[0], first[0][0])


def test_each_epoch_of_a_source_visits_every_window_once():
    a, b = _sources()
    mix = MixtureBatches([a, b], [0.5, 0.5], 16, 8, seed=1)
    W = mix.windows[1]
    src, starts = mix.locate(np.arange(4 * W))
    b_starts = starts[src == 1]
    assert sorted(b_starts[:W].tolist()) == list(range(0, W * 16, 16))  # epoch 0: a permutation
    assert sorted(b_starts[W:2 * W].tolist()) == list(range(0, W * 16, 16))
    assert b_starts[:W].tolist() != b_starts[W:2 * W].tolist()  # epoch 1: another order


# ---------------------------------------------------------------- streaming
def _corpus(tmp_path, n=60):
    d = tmp_path / "stream"
    d.mkdir()
    docs = [f"document {i}: " + "abc def ghi " * (i % 9 + 1) for i in range(n)]
    for part in range(3):
        with open(d / f"part-{part}.jsonl", "w") as f:
            for t in docs[part * n // 3:(part + 1) * n // 3]:
                f.write(json.dumps({"text": t}) + "\n")
    tok = CharTokenizer(sorted(set("".join(docs))))  # it has an end-of-text id of its own
    return d, docs, tok




def test_stream_packs_the_train_documents_in_order(tmp_path):
    d, docs, tok = _corpus(tmp_path)
    stream = TokenStream(d, tok, 8)
    rows = np.stack([stream.next_row() for _ in range(40)])
    train = [t for i, t in enumerate(docs) if i % 10 != 0]
    want = np.concatenate([np.append(tok.encode_array(t), tok.eos_id if tok.eos_id is not None else [])
                           for t in train]).astype(np.int64)
    packed = np.concatenate([rows[0]] + [r[1:] for r in rows[1:]])  # rows overlap by one token
    assert (packed == want[:len(packed)]).all()


def test_ranks_get_disjoint_documents_and_val_is_held_out(tmp_path):
    d, docs, tok = _corpus(tmp_path)
    seen = {}
    for split in ("train", "val"):
        for r in range(2):
            s = TokenStream(d, tok, 8, rank=r, world=2, split=split)
            got = []
            while s.epoch == 0:
                got.append(s._next_document())
            seen[split, r] = got[:-1]  # the last one read is from the next epoch
    train = [t for i, t in enumerate(docs) if i % 10 != 0]
    assert sorted(seen["train", 0] + seen["train", 1]) == sorted(train)
    assert not set(seen["train", 0]) & set(seen["train", 1])
    assert sorted(seen["val", 0] + seen["val", 1]) == sorted(docs[::10]) and seen["val", 1]


def test_stream_resumes_exactly_across_pieces_and_epochs(tmp_path):
    d, docs, tok = _corpus(tmp_path)
    make = lambda: StreamBatches(TokenStream(d, tok, 16, piece_bytes=300), 4)  # noqa: E731  tiny pieces
    run = make()
    batches = [run.batch(s) for s in range(160)]  # several epochs of this small corpus
    assert run.stream.epoch >= 2 and len(run.stream.pieces) > 5
    state = run.state_dict(37)
    state = torch.load(_save(tmp_path, state), weights_only=False)  # as a checkpoint round-trips it
    resumed = make()
    resumed.load_state_dict(state, 37)
    for s in range(37, 160):
        assert all(torch.equal(u, v) for u, v in zip(resumed.batch(s), batches[s])), s
    with pytest.raises(GptlabError, match="read in order"):
        resumed.batch(5)


def _save(tmp_path, state):
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


def test_a_rank_count_change_is_refused(tmp_path):
    d, _, tok = _corpus(tmp_path)
    state = TokenStream(d, tok, 8, rank=0, world=2).state_dict()
    with pytest.raises(GptlabError, match="rank 0 of 2 processes, this is rank 0 of 1"):
        TokenStream(d, tok, 8).load_state_dict(state)


def test_stream_shards_split_every_global_batch_by_documents(tmp_path):
    d, docs, tok = _corpus(tmp_path)
    one = StreamBatches(TokenStream(d, tok, 8), 8)
    ranks = [StreamBatches(TokenStream(d, tok, 8), 8).shard(r, 2) for r in range(2)]
    x = [ranks[r].batch(0)[0] for r in range(2)]
    assert one.batch(0)[0].shape == (8, 8) and x[0].shape == x[1].shape == (4, 8)
    assert not torch.equal(x[0], x[1])  # rank 1 starts at document 2 (document 0 is validation)
    want = TokenStream(d, tok, 8, rank=1, world=2)
    assert torch.equal(x[1][0], torch.from_numpy(want.next_row()[:-1]))
    resumed = StreamBatches(TokenStream(d, tok, 8), 8)
    resumed.load_state_dict(one.state_dict(1), 1)
    with pytest.raises(GptlabError, match="only a one-process streamed run resumes"):
        resumed.shard(1, 2)
    with pytest.raises(GptlabError, match="does not split into 3"):
        one.shard(0, 3)


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed")
def test_stream_reads_parquet_row_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, docs, tok = _corpus(tmp_path)
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"text": docs}), tmp_path / "pq" / "a.parquet", row_group_size=7)
    s = TokenStream(tmp_path / "pq", tok, 8)
    got = [s._next_document() for _ in range(54)]
    assert got == [t for i, t in enumerate(docs) if i % 10 != 0]


def test_a_weight_that_is_not_a_number_is_named_when_the_path_before_it_exists(tmp_path):
    (tmp_path / "code").mkdir()
    with pytest.raises(GptlabError, match=r"the weight after ':' must be a number > 0.*\(got 'abc'\)"):
        parse_mixture([f"{tmp_path}/code/:abc", "a.txt:0.7"])
    assert parse_mixture(["no-such:abc"]) == [("no-such:abc", 1.0)]  # a path with a colon: the loader says not found
