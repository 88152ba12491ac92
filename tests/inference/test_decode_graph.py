"""The static decode step (every slot, fixed shapes) that the engine captures as a CUDA graph.

On CPU the step runs uncaptured: the tests check it gives the engine's usual tokens and logits, that
it never reads a tensor back to the host (what capture forbids) and that idle rows touch no slot's
tokens. The CUDA tests check the capture itself and run where a GPU is present.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gptlab.inference.engine import Engine, Request
from gptlab.inference.graphs import DecodeGraph
from gptlab.models import build_model
from gptlab.models.attention import SlotCache, StaticBatch
from gptlab.models.llama import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_engine import V, _alone, _prompt, _tiny  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _mixed_run(model, static: bool, sampled: bool, capture_after: int | None = None, engine=None) -> list[list[int]]:
    """Requests of mixed prompt lengths that join and leave mid-way; each request's tokens."""
    engine = engine or Engine(model, max_batch=3, static_decode=static)
    assert (engine.graph is not None) == static
    if capture_after is not None:
        engine.graph.capture_after = capture_after
    kw = {"temperature": 0.9, "top_k": 20} if sampled else {}
    handles = [engine.submit(Request(_prompt(n, seed=n), max_tokens=m, seed=n, **kw))
               for n, m in ((5, 12), (11, 4), (2, 9))]
    steps = 0
    for _ in engine.run():
        steps += 1
        if steps == 6:  # two more join while others run: one into a slot freed mid-way
            handles += [engine.submit(Request(_prompt(n, seed=n), max_tokens=7, seed=n, **kw)) for n in (8, 3)]
    return [h.tokens for h in handles]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("sampled", [False, True])
def test_the_static_step_gives_the_engines_own_tokens(family, sampled):
    model = _tiny(family)
    assert _mixed_run(model, True, sampled) == _mixed_run(model, False, sampled)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_static_logits_equal_the_slot_batch_logits(family):
    model = _tiny(family)
    cache = model.new_slot_cache(4, 32, spare=True)
    with torch.inference_mode():
        for slot, ids in ((0, _prompt(6, 1)), (2, _prompt(13, 2))):  # slots 1 and 3 stay idle
            model.features(torch.tensor([ids]), cache.rows(torch.tensor([slot]), torch.arange(len(ids))[None]))
        step = DecodeGraph(model, cache, capture=False)
        got = step([0, 2], [7, 9], [6, 13])
        ref_cache = model.new_slot_cache(4, 32)
        for slot, ids in ((0, _prompt(6, 1) + [7]), (2, _prompt(13, 2) + [9])):
            model.features(torch.tensor([ids[:-1]]), ref_cache.rows(torch.tensor([slot]), torch.arange(len(ids) - 1)[None]))
        h = model.features(torch.tensor([[7], [9]]), ref_cache.rows(torch.tensor([0, 2]), torch.tensor([[6], [13]])))
        want = model.get_head()(h[:, -1]).float()
    assert got.shape == (2, V)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _HostReads(TorchDispatchMode):
    """Counts the operations that read a tensor's value back to the host (a CUDA graph cannot hold them)."""

    READS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero",
             "aten::equal", "aten::masked_select"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.READS:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_static_step_reads_nothing_back_to_the_host(family):
    model = _tiny(family)
    cache = model.new_slot_cache(3, 16, spare=True)
    step = DecodeGraph(model, cache, capture=False)
    step.pos[:, 0] = torch.tensor([4, 16, 9])  # row 1 idle
    with torch.inference_mode(), _HostReads() as mode:
        logits = step._step(16)
    assert logits.shape == (3, V)
    assert mode.seen == []
    # the same check catches the engine's usual slot batch, which does read positions back
    with torch.inference_mode(), _HostReads() as mode:
        model.features(torch.tensor([[1], [2]]), model.new_slot_cache(2, 16).rows(torch.tensor([0, 1]), torch.tensor([[3], [5]])))
    assert mode.seen  # e.g. aten::item


def test_idle_rows_write_only_the_spare_index():
    model = _tiny("llama")
    cache = model.new_slot_cache(3, 16, spare=True)
    for t in cache.k + cache.v:
        t.normal_()
    before = [t[:, :, :16].clone() for t in cache.k + cache.v]
    with torch.inference_mode():
        DecodeGraph(model, cache, capture=False)([1], [5], [3])  # slots 0 and 2 idle
    for old, new in zip(before, cache.k + cache.v):
        changed = (old != new[:, :, :16]).any(-1)  # (N, Hkv, L)
        assert not changed[[0, 2]].any()  # idle slots: untouched
        assert changed[1, :, 3].all() and changed[1].sum() == changed.shape[1]  # slot 1: position 3 only


def test_the_static_batch_checks_its_cache_and_shapes():
    plain = SlotCache(1, 2, 1, 8, 4, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="spare=True"):
        StaticBatch(plain, torch.zeros(2, 1, dtype=torch.long))
    spare = SlotCache(1, 2, 1, 8, 4, dtype=torch.float32, device="cpu", spare=True)
    assert spare.k[0].shape == (2, 1, 9, 4)
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        StaticBatch(spare, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="ring"):
        SlotCache(1, 2, 1, 8, 4, dtype=torch.float32, device="cpu", ring=4, spare=True)


def test_a_sliding_window_ring_decodes_without_the_static_step():
    model = _tiny("llama", sliding_window=4)
    engine = Engine(model, max_batch=2, max_len=32, static_decode=True)
    assert engine.graph is None and engine.cache.ring == 4
    h = engine.submit(Request(_prompt(6, 1), max_tokens=5))
    list(engine.run())
    assert len(h.tokens) == 5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_static_step_runs_on_the_meta_device(family):
    """On meta tensors any read of a value (``item``, ``tolist``, a mask index, a host tensor) fails."""
    model = _tiny(family).to("meta")
    cache = model.new_slot_cache(3, 16, spare=True)
    assert cache.k[0].is_meta
    step = DecodeGraph(model, cache, capture=False)
    with torch.inference_mode():
        assert step._step(8).shape == (3, V)


def test_attended_lengths_grow_by_doubling_and_give_the_full_lengths_logits():
    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=V, context_length=512, emb_dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    hidden_dim=64)).eval()
    cache = model.new_slot_cache(2, 300, spare=True)
    step = DecodeGraph(model, cache, capture=False)
    assert [step.length([p]) for p in (0, 63, 64, 127, 128, 299)] == [64, 64, 128, 128, 256, 300]
    with torch.inference_mode():
        ids = _prompt(70, 3)
        model.features(torch.tensor([ids]), cache.rows(torch.tensor([1]), torch.arange(70)[None]))
        step.ids[:, 0] = torch.tensor([0, 5])
        step.pos[:, 0] = torch.tensor([300, 70])
        short, full = step._step(128), step._step(300)  # the second rewrites the same keys
    torch.testing.assert_close(short[1], full[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="1..300"):
        StaticBatch(cache, step.pos, 301)


def test_the_engine_decodes_with_the_slot_batch_by_default_on_cpu():
    engine = Engine(_tiny("gpt2"), max_batch=2)
    assert engine.graph is None and not engine.cache.spare
    forced = Engine(_tiny("gpt2"), max_batch=2, static_decode=True)
    assert forced.graph is not None and not forced.graph.capture  # CPU: the static step, uncaptured


def test_a_mixture_of_experts_keeps_the_slot_batch_unless_asked(monkeypatch):
    from gptlab.inference import graphs

    monkeypatch.setattr(graphs, "capture_applies", lambda device: True)  # as on a GPU
    assert graphs.static_applies(_tiny("llama"), torch.device("cpu"))
    assert not graphs.static_applies(_tiny("llama", n_experts=4, experts_per_token=2), torch.device("cpu"))


def test_a_failed_capture_falls_back_to_the_slot_batch():
    model = _tiny("llama")
    engine = Engine(model, max_batch=2, static_decode=True)
    engine.graph.failed = True
    h = engine.submit(Request(_prompt(5, 1), max_tokens=6))
    list(engine.run())
    assert h.tokens == _alone(model, Request(_prompt(5, 1), max_tokens=6))


@cuda
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cuda_graph_replays_give_the_uncaptured_tokens(family, monkeypatch):
    monkeypatch.delenv("GPTLAB_CUDA_GRAPHS", raising=False)
    model = _tiny(family).cuda()
    engine = Engine(model, max_batch=3)
    assert engine.graph is not None and engine.graph.capture
    captured = _mixed_run(model, True, sampled=False, capture_after=2, engine=engine)
    assert engine.graph.captures == 1 and engine.graph.replays >= 5 and not engine.graph.failed
    uncaptured = Engine(model, max_batch=3, static_decode=True)
    uncaptured.graph.capture = False
    assert captured == _mixed_run(model, True, sampled=False, engine=uncaptured)
    assert captured == _mixed_run(model, False, sampled=False)
    monkeypatch.setenv("GPTLAB_CUDA_GRAPHS", "0")
    assert Engine(model, max_batch=3).graph is None


@cuda
def test_cuda_graph_is_recaptured_when_a_weight_is_replaced(monkeypatch):
    from gptlab.inference.graphs import CHECK_EVERY

    monkeypatch.delenv("GPTLAB_CUDA_GRAPHS", raising=False)
    model = _tiny("llama").cuda()
    engine = Engine(model, max_batch=2)
    engine.graph.capture_after = 0
    engine.submit(Request(_prompt(5, 1), max_tokens=3))
    list(engine.run())
    assert engine.graph.captures == 1
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 2)
    h = engine.submit(Request(_prompt(5, 1), max_tokens=CHECK_EVERY + 4))
    list(engine.run())
    assert engine.graph.captures == 2
    alone = Engine(model, max_batch=2, static_decode=False)
    h2 = alone.submit(Request(_prompt(5, 1), max_tokens=CHECK_EVERY + 4))
    list(alone.run())
    assert h.tokens[CHECK_EVERY:] == h2.tokens[CHECK_EVERY:]
