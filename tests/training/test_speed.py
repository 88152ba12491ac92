"""Speed settings (threads, the compile cache), the speed ladder on CPU, and the CUDA paths (bf16 autocast,
SDPA flash, compile, pinned memory, fused AdamW), which run where CUDA is present and skip otherwise."""

import os

import pytest
import torch
import torch.nn.functional as F

from gptlab.models import build_model, get_preset
from gptlab.training import TrainConfig, train_loop, window_batches
from gptlab.training.hooks import Counters, Progress, Throughput, to_device
from gptlab.training.ladder import RUNGS, Settings, Shape, build, ladder_command, run_ladder, run_rung
from gptlab.training import loop, speed
from gptlab.training.speed import CompiledModel, compile_cache_dir, match_threads, physical_cores

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TINY = Shape(layers=1, dim=32, heads=2, context=16, batch=2, big_batch=4, vocab=101)


def test_physical_cores_and_threads():
    n = physical_cores()
    assert 1 <= n <= (os.cpu_count() or 1)
    before = torch.get_num_threads()
    try:
        assert match_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_compile_cache_lives_in_gptlab_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    assert compile_cache_dir() == tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "x"))
    assert compile_cache_dir() == tmp_path / "x"


def test_progress_reads_a_tensor_loss_only_when_logging():
    lines = []
    bar = Progress(True, 10, Counters(), 5, lines.append)
    bar.plain, bar.bar = True, None  # as on a non-terminal
    for step in range(1, 11):
        bar.update(Counters(step=step, elapsed=float(step)), torch.tensor(2.5), Throughput())
    assert len(lines) == 2 and "loss 2.500" in lines[0]


def test_ladder_on_cpu_runs_the_rungs_that_apply():
    out = []
    rows = run_ladder(TINY, torch.device("cpu"), steps=1, compile=False, echo=out.append)
    assert [r["rung"] for r in rows] == [r[0] for r in RUNGS]
    skipped = {r["rung"]: r["skipped"] for r in rows if r["skipped"]}
    assert skipped == {"Use tensor cores": "CUDA only", "Pinned memory in the data loader": "CUDA only",
                       "Using pytorch.compile": "compile off (--no-compile)"}
    for r in rows:
        if not r["skipped"]:
            assert r["tokens_per_s"] > 0 and r["memory_gb"] > 0
    assert "12,526" in out[1] and "26.2422" in out[1]  # the book's A100 figures beside ours
    assert "Avg tok/sec" in out[0]


def test_ladder_models_agree_on_shapes_and_the_cli_refuses_bad_sizes():
    x = torch.randint(0, TINY.vocab, (2, TINY.context))
    scratch = build(Settings(), TINY, torch.device("cpu"))
    native = build(Settings(native=True, sdpa=True), TINY, torch.device("cpu"))
    assert scratch(x).shape == native(x).shape == (2, TINY.context, TINY.vocab)
    from gptlab.errors import GptlabError

    with pytest.raises(GptlabError, match="--steps 0 must be >= 1"):
        ladder_command(device="cpu", steps=0)


def test_compiled_model_keeps_the_model_reachable():
    model = build_model(get_preset("gpt2-nano").replace(vocab_size=50, context_length=16, drop_rate=0.0))
    wrapped = CompiledModel(model)  # compiles lazily: nothing is compiled until it is called
    assert wrapped._orig_mod is model
    from gptlab.training.losses import plain_head

    assert plain_head(wrapped) is model.get_head().weight


# ---- denormals ----
TINY_FLOAT = 1e-39  # below float32's smallest normal, 1.18e-38: a denormal


def _denormal_survives(n: int = 1) -> bool:
    """Whether multiplying n denormals by 1 keeps them (on threads that do not flush them). A million
    values spread over every intra-op thread."""
    return bool((torch.full((n,), TINY_FLOAT) * 1.0).ne(0).all())


needs_native = pytest.mark.skipif(speed._denormals() is None, reason="no native code here (x86-64 and a C compiler)")


@needs_native
def test_flush_denormals_sets_every_thread_and_puts_them_back():
    threads = torch.get_num_threads()
    assert speed.denormals_flushed() == 0 and _denormal_survives(1 << 20)
    with speed.flush_denormals("cpu") as on:
        assert on and speed.denormals_flushed() == threads
        assert not (torch.full((1 << 20,), TINY_FLOAT) * 1.0).any()  # flushed on every thread of the op
        assert torch.tensor([1e-30]).mul(2.0).item() == pytest.approx(2e-30)  # normal floats unchanged
        with speed.flush_denormals("cpu"):  # nested: the outer block's state comes back
            pass
        assert speed.denormals_flushed() == threads
    assert speed.denormals_flushed() == 0 and _denormal_survives(1 << 20)


def test_flush_denormals_leaves_other_devices_and_off_alone():
    for device, on in (("cuda", True), ("mps", True), ("cpu", False)):
        with speed.flush_denormals(device, on=on) as took:
            assert took is False and _denormal_survives()


def test_flush_denormals_without_native_code_sets_the_calling_thread(monkeypatch):
    monkeypatch.setattr(speed, "_denormals", lambda: None)
    with speed.flush_denormals("cpu") as took:
        assert took == torch.set_flush_denormal(True)  # what torch can do here: this thread only
        if took:
            assert torch.tensor([TINY_FLOAT]).mul(1.0).item() == 0.0
    assert _denormal_survives()


@needs_native
@pytest.mark.parametrize("flush", [True, False])
def test_train_loop_flushes_denormals_while_it_trains(tmp_path, monkeypatch, flush):
    seen = []
    real = loop.optimizer_step
    monkeypatch.setattr(loop, "optimizer_step", lambda *a: seen.append(speed.denormals_flushed()) or real(*a))
    model = _nano("cpu")
    train = window_batches(torch.randint(0, 97, (2000,)), 16, 16, batch_size=4, seed=1)
    cfg = TrainConfig(max_steps=3, eval_every=3, eval_iters=1, device="cpu", flush_denormals=flush)
    train_loop(model, train, None, cfg, tmp_path, progress=False, echo=lambda m: None)
    assert seen == [torch.get_num_threads() if flush else 0] * 3
    assert speed.denormals_flushed() == 0  # the process as it was


def test_the_cli_takes_flush_denormals_and_passes_it_to_the_loop():
    from gptlab.cli_parser import parse
    from gptlab.training.commands import train
    from gptlab.training.settings import train_config_from

    assert parse(train, [], "gptlab train")["flush_denormals"] is True
    kw = parse(train, ["--flush-denormals", "false"], "gptlab train")
    assert kw["flush_denormals"] is False
    assert TrainConfig().flush_denormals is True
    assert train_config_from(type("S", (), {"flush_denormals": False})()).flush_denormals is False


# ---- CUDA paths ----
def _nano(device, vocab=97):
    torch.manual_seed(0)
    cfg = get_preset("gpt2-nano").replace(vocab_size=vocab, context_length=16, drop_rate=0.0)
    return build_model(cfg).to(device)


@cuda
def test_cuda_ladder_every_rung():
    rows = run_ladder(TINY, torch.device("cuda"), steps=2, compile=True, echo=lambda m: None)
    assert all(r["skipped"] is None and r["tokens_per_s"] > 0 and r["memory_gb"] > 0 for r in rows)


@cuda
def test_cuda_sdpa_flash_matches_math_attention_in_bf16():
    from gptlab.models.gpt2 import GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, context_length=64, emb_dim=128, n_layers=2, n_heads=2, drop_rate=0.0)
    a = build_model(cfg).cuda()
    b = build_model(cfg.replace(attn_impl="math")).cuda()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 97, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(a(x).float(), b(x).float(), rtol=3e-2, atol=3e-2)


@cuda
def test_cuda_fused_adamw_equals_foreach():
    m1, m2 = _nano("cuda"), _nano("cuda")
    x = torch.randint(0, 97, (2, 16), device="cuda")
    for m, fused in ((m1, True), (m2, False)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=fused, foreach=None if fused else True)
        F.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
        opt.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@cuda
def test_cuda_pinned_non_blocking_copy_is_exact():
    batch = (torch.randint(0, 97, (4, 16)).pin_memory(), torch.randint(0, 97, (4, 16)).pin_memory())
    moved = to_device(batch, torch.device("cuda"))
    torch.cuda.synchronize()
    assert all(torch.equal(a, b.cpu()) for a, b in zip(batch, moved))


@cuda
def test_cuda_compile_and_bf16_train_loop(tmp_path):
    model = _nano("cuda")
    tokens = torch.randint(0, 97, (2000,))
    train = window_batches(tokens, 16, 16, batch_size=4, seed=1)
    cfg = TrainConfig(max_steps=4, eval_every=4, eval_iters=1, precision="bf16", compile=True, device="cuda")
    res = train_loop(model, train, None, cfg, tmp_path, progress=False, echo=lambda m: None)
    assert res.step == 4 and res.records[-1]["train_loss"] < 10


@cuda
def test_cuda_run_rung_reports_reserved_memory():
    tps, gb = run_rung(Settings(bf16=True, native=True, sdpa=True, chunked=True, fused=True, pinned=True),
                       TINY, torch.device("cuda"), steps=2)
    assert tps > 0 and gb > 0
