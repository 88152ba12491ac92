"""The one estimator: KV cache, weights, training memory, activations, speed."""

from dataclasses import replace

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.fit.catalog import spec_from_config, spec_from_ref
from gptlab.fit.hardware import native_int4_packs
from gptlab.fit.estimate import (EAGER_OPS, activation_elements_per_token, bytes_per_token, decode_tokens_per_s,
                                 inference_memory, kv_cache_bytes, prefill_seconds, train_tokens_per_s,
                                 training_memory, weights_bytes)
from gptlab.models import build_model, get_preset

from fit_machines import make_hw

GiB = 2**30


def test_kv_cache_exact_figures():
    # 2 · 32 layers · 32 heads · 128 · 8192 · 2 bytes = 4 GiB; Llama 3 has 8 KV heads (GQA): 1 GiB.
    assert kv_cache_bytes(spec_from_ref("llama-2-7b"), 8192, kv_quant="f16") == 4 * GiB
    assert kv_cache_bytes(spec_from_ref("llama-3-8b"), 8192, kv_quant="f16") == 1 * GiB
    assert kv_cache_bytes(spec_from_ref("llama-3-8b"), 8192, kv_quant="q8_0") == pytest.approx(GiB * 34 / 64)
    # The config's own formula agrees.
    cfg = get_preset("llama-3-8b")
    assert kv_cache_bytes(spec_from_ref("llama-3-8b"), 1000, 3) == cfg.kv_cache_bytes(1000, batch=3)


def test_kv_cache_respects_sliding_window():
    mistral = spec_from_ref("mistral-7b")
    assert mistral.sliding_window == 4096
    assert kv_cache_bytes(mistral, 32768) == kv_cache_bytes(mistral, 4096) == 0.5 * GiB
    assert kv_cache_bytes(mistral, 1024) == 0.125 * GiB
    with pytest.raises(GptlabError, match="must be at least 1"):
        kv_cache_bytes(mistral, 0)


def test_kv_cache_matches_a_real_gptlab_cache():
    cfg = get_preset("llama-micro")
    model = build_model(cfg)
    cache = model.new_cache(2, 100, dtype=torch.float16)
    real = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    assert kv_cache_bytes(spec_from_config(cfg), 100, 2, "f16") == real


def test_weights_at_quants(smollm2_path):
    s = spec_from_ref("llama-3-8b")
    assert weights_bytes(s, "BF16") == s.params_total * 2
    assert weights_bytes(s, "Q4_K_M") / GiB == pytest.approx(8_030_261_248 * 4.85 / 8 / GiB, rel=0.01)
    g = spec_from_ref(str(smollm2_path))
    assert weights_bytes(g, "Q4_1") == g.native_weight_bytes  # the file's real size, not an average
    assert weights_bytes(g, "F32") == g.params_total * 4


def test_inference_memory_parts(hw):
    s = spec_from_ref("llama-3-8b")
    m = inference_memory(s, hw, "Q4_K_M", 8192, engine="llama.cpp")
    assert m.kv_cache == GiB
    assert m.total == pytest.approx(m.weights + m.kv_cache + m.compute + m.runtime)
    d = m.gib()
    assert {"weights_gib", "kv_cache_gib", "total_gib"} <= d.keys()
    with pytest.raises(GptlabError, match="gptlab engine dequantizes"):
        inference_memory(s, hw, "Q4_K_M", 8192, engine="gptlab")
    with pytest.raises(GptlabError, match="unknown engine 'vllm'"):
        inference_memory(s, hw, "BF16", 8192, engine="vllm")


def test_training_memory_per_optimizer_and_precision(hw):
    s = spec_from_ref("gpt2-124m")
    P = s.params_total
    m = training_memory(s, hw, 1, 128, "fp32", "adamw")
    assert (m.weights, m.gradients, m.optimizer) == (4 * P, 4 * P, 8 * P)  # 16 bytes/param
    assert training_memory(s, hw, 1, 128, "fp32", "sgd").optimizer == 0
    assert training_memory(s, hw, 1, 128, "fp32", "sgd-momentum").optimizer == 4 * P
    assert training_memory(s, hw, 1, 128, "fp32", "lion").optimizer == 4 * P
    bf = training_memory(s, hw, 1, 128, "bf16", "adamw")
    assert (bf.weights, bf.gradients, bf.optimizer) == (2 * P, 2 * P, 4 * P)
    mixed = training_memory(s, hw, 1, 128, "bf16-mixed", "adamw")
    assert mixed.weights == 4 * P and mixed.activations < m.activations
    big = training_memory(s, hw, 8, 1024, "fp32", "adamw")
    ckpt = training_memory(s, hw, 8, 1024, "fp32", "adamw", checkpointing=True)
    per_layer, _ = activation_elements_per_token(s)
    saved = 8 * 1024 * (s.n_layers * per_layer * 4 - s.n_layers * s.emb_dim * 4 - per_layer * 4)
    assert big.activations - ckpt.activations == pytest.approx(saved)  # keeps block inputs + one block
    assert big.activations == pytest.approx(64 * m.activations)  # linear in batch x context
    with pytest.raises(GptlabError, match="optimizer 'adafactor' must be one of"):
        training_memory(s, hw, 1, 128, "fp32", "adafactor")
    with pytest.raises(GptlabError, match="precision 'fp8' must be one of"):
        training_memory(s, hw, 1, 128, "fp8")


@pytest.mark.parametrize("preset", ["gpt2-micro", "llama-micro"])
def test_activation_count_matches_what_autograd_saves(preset):
    """Saved-tensor bytes of one fp32 forward vs the per-token formula (within 25%)."""
    cfg = get_preset(preset).replace(vocab_size=512)
    model = build_model(cfg)
    B, T = 2, 64
    ids = torch.randint(0, 512, (B, T))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids)
    total = [sum(storages.values())]
    per_layer, _head = activation_elements_per_token(spec_from_config(cfg))
    predicted = B * T * cfg.n_layers * per_layer * 4
    measured_layers = total[0] - B * T * cfg.emb_dim * 4 * 2  # minus final norm input/output
    assert logits.shape == (B, T, 512)
    assert predicted == pytest.approx(measured_layers, rel=0.25)


@pytest.mark.parametrize("preset,family", [("gpt2-nano", "gpt2"), ("llama-micro", "llama")])
def test_eager_op_counts_are_current(preset, family):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for L in (2, 4):
        Count.n = 0
        model = build_model(get_preset(preset).replace(n_layers=L)).eval()
        cache = model.new_cache(1, 16)
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]), cache)
            with Count():
                model(torch.tensor([[4]]), cache)
        counts.append(Count.n)
    per_layer = (counts[1] - counts[0]) // 2
    assert (per_layer, counts[0] - 2 * per_layer) == EAGER_OPS[family]


def test_decode_speed_follows_bandwidth_and_quant():
    s = spec_from_ref("llama-3-8b")
    slow, fast = make_hw(bandwidth=50e9), make_hw(bandwidth=100e9)
    t_slow = decode_tokens_per_s(s, slow, "Q4_K_M", 4096)
    assert decode_tokens_per_s(s, fast, "Q4_K_M", 4096) == pytest.approx(2 * t_slow)
    # memory-bound: tok/s = efficiency · bandwidth / bytes per token
    assert t_slow == pytest.approx(0.8 * 50e9 / bytes_per_token(s, "Q4_K_M", 4096))
    assert decode_tokens_per_s(s, slow, "Q8_0", 4096) < t_slow
    assert decode_tokens_per_s(s, slow, "Q4_K_M", 8000) < t_slow  # longer history, more KV to read
    # prefill is FLOP-bound: 512 tokens take ~ 512 · 2 · N / (peak · eff)
    p = prefill_seconds(s, slow, "Q4_K_M", 512)
    assert p == pytest.approx(512 * 2 * 7.5e9 / (2e12 * 0.5), rel=0.15)


def test_moe_reads_only_active_experts(hw):
    import transformers as tf

    from gptlab.fit.catalog import spec_from_hf_config

    cfg = tf.MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                           num_experts_per_tok=2).to_dict()
    s = spec_from_hf_config(cfg, "mixtral-8x7b")
    assert s.params_total / 1e9 == pytest.approx(46.7, abs=0.1)
    assert s.params_active / 1e9 == pytest.approx(12.9, abs=0.1)
    assert weights_bytes(s, "BF16") == 2 * s.params_total
    assert bytes_per_token(s, "BF16", 1) < 2 * s.params_active


def test_training_speed_uses_six_n(hw):
    s = spec_from_ref("gpt2-124m")
    tps = train_tokens_per_s(s, hw, 256, "fp32")
    flops = 3 * 2 * (s.params_total - s.params_embedding + s.params_lm_head)  # + a small attention term
    assert tps == pytest.approx(1e12 * 0.35 / flops, rel=0.05)


def test_both_engines_keep_only_the_window_of_a_sliding_window_model(hw):
    """gptlab's engine rings a sliding-window model's cache (the last W tokens), as llama.cpp does; inspect's
    windowed figure is what fit plans, and the engine's cache really is that size."""
    from gptlab.inspect import summarize
    from gptlab.models import build_model, empty_model

    mistral = spec_from_ref("mistral-7b")
    # 2 · 32 layers · 8 KV heads · 128 · 4096 window tokens · 2 bytes = 0.5 GiB (all 32768 tokens: 4 GiB).
    assert kv_cache_bytes(mistral, 32768, engine="gptlab") == 0.5 * GiB
    assert kv_cache_bytes(mistral, 32768, engine="llama.cpp") == 0.5 * GiB
    assert kv_cache_bytes(mistral, 2048, engine="gptlab") == 0.25 * GiB  # shorter than the window: every token
    s = summarize(empty_model(get_preset("mistral-7b")))
    assert s["kv_cache_bytes_windowed"]["bf16"] == inference_memory(mistral, hw, "BF16", 32768, engine="gptlab").kv_cache
    assert s["kv_cache_bytes_windowed"]["bf16"] == inference_memory(mistral, hw, "Q4_K_M", 32768).kv_cache
    # Both engines read only the window's K/V per decode step.
    assert bytes_per_token(mistral, "BF16", 32768) == bytes_per_token(mistral, "BF16", 4096)
    # The engine's own cache of a tiny windowed model holds W positions a slot, not the context.
    cfg = get_preset("llama-micro").replace(sliding_window=16, context_length=64)
    cache = build_model(cfg).new_slot_cache(2, 64)
    assert cache.ring == 16 and tuple(cache.k[0].shape) == (2, cfg.n_kv_heads, 16, cfg.head_dim)


def test_sizes_are_the_configs_methods():
    """fit's FLOPs and KV figures are ModelConfig's (one formula set), also for a checkpoint without a family."""
    import transformers as tf

    from gptlab.fit.catalog import CountedConfig, spec_from_hf_config
    from gptlab.fit.estimate import flops_per_token

    for spec in (spec_from_ref("mistral-7b"), spec_from_ref("gpt2-124m")):
        assert flops_per_token(spec, 8192) == spec.config.flops_per_token(8192)
    moe = spec_from_hf_config(tf.MixtralConfig(vocab_size=320, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                               num_local_experts=4, num_experts_per_tok=2).to_dict(), "moe")
    assert isinstance(moe.config, CountedConfig) and moe.config.active_params() == moe.params_active
    assert flops_per_token(moe, 100) == 2 * (moe.params_active - moe.params_embedding + 320 * 64) + 4 * 3 * 100 * 64


def _held_bytes(model, slot: str = "_packed") -> int:
    """Bytes a model holds: parameters and buffers once each, plus the packed copies kept in ``slot``
    (``_packed``: PyTorch's int4 CPU kernel's; ``_native_pack``: the VNNI kernels')."""
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n + _packed_bytes(model, slot)


def _packed_bytes(model, slot: str) -> int:
    n = 0
    for m in model.modules():
        packed = m.__dict__.get(slot)
        if packed:
            n += sum(x.numel() * x.element_size() for x in packed[2:])  # (sources, their addresses, *copy)
    return n


@pytest.mark.parametrize("preset", ["gpt2-micro", "llama-micro"])
@pytest.mark.parametrize("quant", ["INT8", "INT4"])
def test_gptlab_quantize_is_planned_at_the_bytes_it_holds(preset, quant, hw):
    """`--engine gptlab --quant INT8|INT4` sizes what `--quantize int8|int4` holds (bf16 rest), within 1 %."""
    from gptlab.inference.quantize import apply_quantization

    cfg = get_preset(preset)
    model = build_model(cfg).to(torch.bfloat16).eval()
    apply_quantization(model, quant.lower())
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # (PyTorch's int4 CPU kernel would pack a second copy here)
    spec = spec_from_config(cfg)
    from gptlab.inference import native
    if native.kernels() is None:
        pytest.skip("without gptlab's native kernels PyTorch's int4 kernel holds a second copy")
    assert weights_bytes(spec, quant) == pytest.approx(_held_bytes(model), rel=0.01)
    m = inference_memory(spec, hw, quant, 64, engine="gptlab")
    assert m.weights == weights_bytes(spec, quant) and m.cpu_packed == 0  # (hw: a machine without VNNI)
    here = inference_memory(spec, replace(hw, int4_packed=native_int4_packs()), quant, 64, engine="gptlab")
    assert here.cpu_packed == pytest.approx(_packed_bytes(model, "_native_pack"), rel=0.01, abs=1)
    # A decode step reads one row of the embedding and one copy of the codes.
    assert bytes_per_token(spec, quant, 1) < m.weights


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_vnni_packed_copies_are_planned_at_the_bytes_they_hold(family, hw):
    """On an AVX-512 VNNI CPU an int4 model's first forward packs its block layers and its int8 head again:
    fit's CPU-only path counts exactly those bytes (a model whose every layer and head packs)."""
    from gptlab.fit.plan import run_paths
    from gptlab.inference import native
    from gptlab.inference.quantize import apply_quantization
    from gptlab.models.gpt2 import GPT2Config
    from gptlab.models.llama import LlamaConfig

    if not (native_int4_packs() and native.kernels() is not None):
        pytest.skip("the packed copies are made on AVX-512 VNNI CPUs with gptlab's native kernels only")
    cfg = (LlamaConfig(vocab_size=512, context_length=64, emb_dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                       hidden_dim=256) if family == "llama" else
           GPT2Config(vocab_size=512, context_length=64, emb_dim=128, n_layers=2, n_heads=4))
    model = build_model(cfg).to(torch.bfloat16).eval()
    apply_quantization(model, "int4")
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    held = _packed_bytes(model, "_native_pack")
    spec, vnni = spec_from_config(cfg), replace(hw, int4_packed=True)
    head = 512 * 128  # the int8 head's packed copy: a byte a weight
    assert native.packed_copy(model.get_head()) and held > 2 * head
    m = inference_memory(spec, vnni, "INT4", 64, engine="gptlab")
    assert m.cpu_packed == pytest.approx(held, rel=0.01)
    assert m.cpu_total == m.total + m.cpu_packed
    cpu = next(p for p in run_paths(spec, vnni, "INT4", 64, "gptlab") if p.name == "CPU-only")
    assert cpu.needed_gib == pytest.approx(m.cpu_total / 2**30)
    for q, machine, engine in (("INT8", vnni, "gptlab"), ("INT4", hw, "gptlab"), ("Q4_1", vnni, "llama.cpp")):
        assert inference_memory(spec, machine, q, 64, engine=engine).cpu_packed == 0  # nothing packed there


def test_native_int4_packs_follows_the_switches(monkeypatch):
    """No packed copies with native code off or int4 activations kept in float, whatever the CPU."""
    monkeypatch.setenv("GPTLAB_NATIVE", "0")
    assert not native_int4_packs()
    monkeypatch.delenv("GPTLAB_NATIVE")
    monkeypatch.setenv("GPTLAB_INT4_ACTIVATIONS", "float")
    assert not native_int4_packs()
    monkeypatch.delenv("GPTLAB_INT4_ACTIVATIONS")
    from gptlab.inference import native

    lib = native.kernels()
    if lib is not None:  # the kernels' own answer
        before = native.set_int4_activations("int8")
        try:
            assert native_int4_packs() == bool(lib.gptlab_q4_packs(16, 64))
        finally:
            native.set_int4_activations(before)


def test_gptlab_formats_belong_to_the_gptlab_engine(hw):
    from gptlab.fit.plan import make_plan

    s = spec_from_ref("llama-3-8b")
    plan = make_plan(s, hw, context=4096, quant="int4", engine="gptlab")
    assert plan.inputs["quant"] == "INT4" and {"BF16", "INT8", "INT4"} <= plan.max_context.keys()
    # INT8: 8 bits + a bf16 scale per 4096-wide row for the blocks, the head int8, the embedding bf16.
    blocks = s.params_total - s.params_embedding - s.params_lm_head
    assert weights_bytes(s, "INT8") == pytest.approx(blocks * (1 + 2 / 4096) + s.params_lm_head * (1 + 2 / 4096)
                                                     + 2 * s.params_embedding)
    with pytest.raises(GptlabError, match="gptlab's own format"):
        inference_memory(s, hw, "INT4", 4096, engine="llama.cpp")


def test_the_compute_buffer_counts_the_logits_the_engine_really_makes():
    """gptlab's engine runs the head on each prompt's last position only: the plan counts V logits per
    sequence, not chunk x V (that was 100 MB too many for SmolLM2 at a 512-token chunk)."""
    from gptlab.fit.estimate import ENGINES, compute_buffer_bytes
    from gptlab.inference.engine import Engine, Request

    cfg = get_preset("llama-micro")
    model = build_model(cfg).eval()
    rows = []
    hook = model.get_head().register_forward_hook(lambda m, a, out: rows.append(out.shape[:-1].numel()))
    engine = Engine(model, max_batch=2, prefill_chunk=512)
    for n in (cfg.context_length - 1, 40):
        engine.submit(Request(list(range(1, n + 1)), max_tokens=1))
    with torch.no_grad():
        list(engine.run())
    hook.remove()
    assert max(rows) == 1  # one row of logits per call, the longest prompt's included
    spec = spec_from_config(cfg)
    hidden = 512 * 8 * cfg.emb_dim * 4
    for batch in (1, 2):
        assert compute_buffer_bytes(spec, 4096, ENGINES["gptlab"], batch) == batch * (cfg.vocab_size * 4 + hidden)
