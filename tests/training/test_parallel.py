"""The pieces of parallel training that need no second process: torchrun's environment, each rank's part
of a batch, the global batch kept across process counts, activation checkpointing, failure reports."""

import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.models import build_model, get_preset
from gptlab.training import RandomWindows, TrainConfig, train_loop, window_batches
from gptlab.training.distributed import (LOST_PEER_EXIT, Dist, LostPeer, backend_for, first_failure, rank_error,
                                         read_env, setup, under_torchrun)
from gptlab.training.parallel import parallelize, resolve_strategy


def test_torchrun_environment():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert under_torchrun(env) and not under_torchrun({})
    assert read_env(env) == (3, 4, 1)
    with pytest.raises(GptlabError, match="0 <= RANK < WORLD_SIZE"):
        read_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(GptlabError, match="not numbers"):
        read_env({"RANK": "x", "WORLD_SIZE": "2"})
    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 0)) == "nccl"
    d = setup("cpu", environ={})  # no torchrun: one plain process, no process group
    assert (d.rank, d.world, d.is_main, d.active) == (0, 1, True, False)


def test_strategy_needs_a_process_group():
    assert resolve_strategy("auto", Dist()) == "none"
    assert resolve_strategy("auto", Dist(backend="gloo", world=2)) == "ddp"
    with pytest.raises(GptlabError, match="needs a process group"):
        resolve_strategy("fsdp", Dist())


def test_ranks_read_disjoint_parts_that_make_the_global_batch():
    tokens = np.arange(2000) % 97
    whole = window_batches(tokens, 8, 8, batch_size=6, seed=3)
    parts = [window_batches(tokens, 8, 8, batch_size=6, seed=3).shard(r, 3) for r in range(3)]
    for step in (0, 5, len(whole) + 2):  # a later epoch too (another permutation)
        x = whole.batch(step)[0]
        xs = [p.batch(step)[0] for p in parts]
        assert all(len(p) == 2 for p in xs)
        assert torch.equal(torch.cat(xs), x)
    with pytest.raises(GptlabError, match="does not split into 4"):
        window_batches(tokens, 8, 8, batch_size=6).shard(0, 4)
    # random windows of a prepared corpus: the same split of the same draws
    memmap_like = tokens.astype(np.uint16)
    whole = RandomWindows(memmap_like, 8, 4, seed=2)
    parts = [RandomWindows(memmap_like, 8, 4, seed=2).shard(r, 2) for r in range(2)]
    assert torch.equal(torch.cat([p.batch(7)[1] for p in parts]), whole.batch(7)[1])


def test_a_resumed_run_keeps_its_global_batch():
    cfg = TrainConfig(max_steps=1, batch_size=4, world_size=2)  # started as 2 processes x 4
    assert (cfg.for_world(1).batch_size, cfg.for_world(4).batch_size, cfg.for_world(8).batch_size) == (8, 2, 1)
    with pytest.raises(GptlabError, match="does not split evenly into 3 processes"):
        cfg.for_world(3)


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = build_model(get_preset("gpt2-nano").replace(vocab_size=40, context_length=16, drop_rate=0.1))
    tokens = (np.arange(3000) * 7) % 40
    return model, window_batches(tokens[:2500], 16, 8, batch_size=4, seed=1), \
        window_batches(tokens[2500:], 16, 16, batch_size=4, shuffle=False, drop_last=False)


def test_activation_checkpointing_changes_no_number(tmp_path):
    """Recomputed blocks (dropout masks replayed) give bitwise the same run; parameter names unchanged."""
    cfg = dict(max_steps=6, lr=3e-3, eval_every=3, eval_iters=2, precision="fp32", device="cpu", seed=5)
    model, train, val = _tiny()
    plain = train_loop(model, train, val, TrainConfig(**cfg), tmp_path / "a", progress=False)
    model2, train2, val2 = _tiny()
    keys = list(model2.state_dict())
    par = parallelize(model2, Dist(), "none", activation_checkpointing=True)
    ckpt = train_loop(model2, train2, val2, TrainConfig(**cfg), tmp_path / "b", progress=False, parallel=par)
    assert [(r["train_loss"], r["val_loss"]) for r in plain.records] == \
        [(r["train_loss"], r["val_loss"]) for r in ckpt.records]
    assert list(model2.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_the_rank_that_stopped_the_run_is_the_one_reported():
    f = lambda code, t: SimpleNamespace(exitcode=code, timestamp=t)  # noqa: E731
    # rank 0 lost contact (and noticed first); rank 1 was killed; rank 2 was stopped by the launcher
    failures = {0: f(LOST_PEER_EXIT, 1.0), 1: f(-signal.SIGKILL, 2.0), 2: f(-signal.SIGTERM, 3.0)}
    assert first_failure(failures)[0] == 1
    d = Dist(rank=0, world=2, backend="gloo")
    assert isinstance(rank_error(RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234"), d), LostPeer)
    err = rank_error(GptlabError("the training data has 3 tokens"), Dist(rank=1, world=2, backend="gloo"))
    assert str(err) == "rank 1 of 2: the training data has 3 tokens" and not isinstance(err, LostPeer)


def test_launch_passes_nodes_and_rendezvous_to_torchrun(monkeypatch):
    """--nproc/--nnodes/--rdzv-endpoint become torchrun's arguments; the workers get every other setting."""
    import yaml

    import gptlab.training.distributed as D

    seen = {}

    def fake_agent(args, run_dir):
        seen["args"] = args
        seen["settings"] = yaml.safe_load(open(args.training_script_args[-1]))
        return 0

    monkeypatch.setattr(D, "_run_agent", fake_agent)
    monkeypatch.setenv(D.LAUNCHED, "")  # launch() sets it for its workers; undone after the test
    assert D.launch(["finetune", "classify"], D.settings_for_workers({"nproc": 8, "nnodes": "2", "lr": 0.1,
                                                                       "rdzv_endpoint": "node0:29500"}),
                    nproc=8, nnodes="2", rdzv_endpoint="node0:29500") == 0
    a = seen["args"]
    assert (a.nproc_per_node, a.nnodes, a.rdzv_backend, a.rdzv_endpoint, a.max_restarts) == \
        ("8", "2", "c10d", "node0:29500", 0)
    assert a.module and a.training_script == "gptlab" and a.training_script_args[:3] == ["finetune", "classify", "--config"]
    assert seen["settings"] == {"lr": 0.1}
    one_node = {}
    monkeypatch.setattr(D, "_run_agent", lambda args, run_dir: one_node.setdefault("a", args) and 0)
    D.launch(["train"], {}, nproc=2)
    assert one_node["a"].standalone and one_node["a"].nproc_per_node == "2"
