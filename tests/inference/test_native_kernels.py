"""gptlab's native CPU kernels (inference/kernels.c): each checked against a float64 reference of its formula."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from gptlab.inference import native
from gptlab.inference.quantize import Int4Linear, Int8Linear, quantize_int4
from gptlab.models.llama import RMSNorm

needs_kernels = pytest.mark.skipif(native.kernels() is None, reason="the native kernels cannot be built here")


def _x_quantized_per_group(x: torch.Tensor) -> torch.Tensor:
    """x as the int4 integer path sees it: each 32-input group rounded to int8 steps of amax/127."""
    g = x.double().reshape(x.shape[0], -1, 32)
    d = g.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(d > 0, torch.round(g / torch.where(d > 0, d, 1)), torch.zeros_like(g))
    return (q * d).reshape(x.shape)


SHAPES = [(1, 576, 576), (3, 1536, 576), (5, 577, 1536), (4, 49, 64), (9, 100, 96), (17, 40, 320)]


@needs_kernels
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int4_kernel_equals_its_formula(m, n, k):
    torch.manual_seed(m * n + k)
    lin = nn.Linear(k, n)
    layer = Int4Linear(lin)
    x = torch.randn(m, k) * 3
    w = layer.dequantized().double()
    mins = layer.minimum.double().repeat_interleave(32, dim=1)  # (n, k): each group's minimum
    # the integer path (AVX2; AVX-512 VNNI for even group counts): scale·code meets x rounded to int8
    # per group, the minimum meets the exact sum of x; otherwise x stays float32
    integer = native.int4_rounds_activations(k)
    xs = _x_quantized_per_group(x) if integer else x.double()
    ref = xs @ (w - mins).t() + x.double() @ mins.t() + lin.bias.double()
    got = native.q4_matmul(x, layer.codes, layer.scale, layer.minimum, layer.bias)
    # float32 accumulation is all that remains
    assert (got.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    full = x.double() @ w.t() + lin.bias.double()  # and near the unquantized activations (~1%)
    assert (got.double() - full).abs().max() <= 0.03 * full.abs().max()


needs_packing = pytest.mark.skipif(native.kernels() is None or not native.kernels().gptlab_q4_packs(64, 576),
                                   reason="the packed int4 layout is for AVX-512 VNNI CPUs")


@needs_packing
@pytest.mark.parametrize("m,n,k", [(1, 576, 576), (8, 1536, 576), (3, 192, 1536), (9, 48, 64), (17, 32, 320)])
def test_packed_int4_equals_its_formula_and_the_plain_layout(m, n, k):
    """The outer-product kernel on the packed copy: the same formula as the plain layout's integer path
    (x rounded to int8 per 32-group, the minimum against the exact Σx), to float32 accumulation."""
    torch.manual_seed(m + n + k)
    lin = nn.Linear(k, n)
    layer = Int4Linear(lin)
    x = torch.randn(m, k) * 3
    packed = native.packed_int4(layer)
    assert packed is not None and packed[0].shape == layer.codes.shape
    assert native.packed_int4(layer)[0] is packed[0]  # made once
    got = native.q4_matmul(x, layer.codes, layer.scale, layer.minimum, layer.bias, packed)
    w = layer.dequantized().double()
    mins = layer.minimum.double().repeat_interleave(32, dim=1)
    ref = _x_quantized_per_group(x) @ (w - mins).t() + x.double() @ mins.t() + lin.bias.double()
    assert (got.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    plain = native.q4_matmul(x, layer.codes, layer.scale, layer.minimum, layer.bias)
    assert (got - plain).abs().max() <= 1e-5 * plain.abs().max()
    assert torch.equal(layer(x), got)  # the layer's own forward reads the packed copy
    for i in range(m):  # and a row's result does not depend on the rows sharing its call
        assert torch.equal(native.q4_matmul(x[i:i + 1], layer.codes, layer.scale, layer.minimum, layer.bias,
                                            packed)[0], got[i])


@needs_packing
@pytest.mark.parametrize("m,n,k", [(1, 576, 576), (8, 4096, 576), (3, 48, 64), (9, 32, 1536)])
def test_packed_int8_head_equals_its_formula(m, n, k):
    """An int4 model's int8 head on the packed copy: x rounded to int8 per 32-group, exact int32 dots."""
    torch.manual_seed(m + n + k)
    lin = nn.Linear(k, n)
    layer = Int8Linear(lin)
    layer.rounds_activations = True
    x = torch.randn(m, k) * 3
    packed = native.packed_int8(layer)
    assert packed is not None and native.packed_int8(layer)[0] is packed[0]
    got = native.i8_matmul(x, layer.weight_int8, layer.scale, layer.bias, True, packed)
    ref = _x_quantized_per_group(x) @ layer.dequantized().double().t() + lin.bias.double()
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(layer(x), got)  # the head's own forward reads the packed copy
    for i in range(m):
        assert torch.equal(native.i8_matmul(x[i:i + 1], layer.weight_int8, layer.scale, layer.bias, True,
                                            packed)[0], got[i])
    plain = Int8Linear(lin)  # (an int8 model's layers keep float x and make no copy)
    assert torch.equal(plain(x), native.i8_matmul(x, plain.weight_int8, plain.scale, plain.bias))
    assert "_native_pack" not in plain.__dict__


@needs_packing
def test_the_packed_copy_follows_replaced_weights_and_stays_out_of_the_state_dict():
    layer = Int4Linear(nn.Linear(576, 64))
    x = torch.randn(2, 576)
    first = native.packed_int4(layer)
    layer.scale = layer.scale * 2  # a new tensor in the buffer's place
    second = native.packed_int4(layer)
    assert second[1] is not first[1] and torch.equal(second[1], first[1] * 2)
    torch.testing.assert_close(layer(x), native.q4_matmul(x, layer.codes, layer.scale, layer.minimum, layer.bias))
    assert set(layer.state_dict()) == {"codes", "scale", "minimum", "bias"}
    other = Int4Linear(nn.Linear(576, 64))
    layer.load_state_dict(other.state_dict())  # written in place: the same tensors at the same addresses
    torch.testing.assert_close(layer(x), other(x))
    import pickle

    assert "_native_pack" not in pickle.loads(pickle.dumps(layer)).__dict__ and "_native_pack" in layer.__dict__
    assert native.packed_int4(Int4Linear(nn.Linear(576, 40))) is None  # rows not a multiple of 16


@needs_packing
def test_a_nan_reaching_the_packed_head_comes_out_nan():
    head = Int8Linear(nn.Linear(576, 64))
    head.rounds_activations = True
    x = torch.randn(2, 576)
    x[0, 100] = float("nan")
    x[1, 7] = float("inf")
    y = head(x)
    assert "_native_pack" in head.__dict__ and y.isnan().all()


@needs_kernels
@pytest.mark.parametrize("rounded", [False, True], ids=["float-x", "rounded-x"])
@pytest.mark.parametrize("m,n,k", SHAPES + [(2, 33, 50)])
def test_int8_kernel_equals_its_formula(m, n, k, rounded):
    """rounded=True (an int4 model's int8 head): x rounded to int8 per 32-group where the integer path runs."""
    torch.manual_seed(m + n * k)
    lin = nn.Linear(k, n)
    layer = Int8Linear(lin)
    x = torch.randn(m, k) * 3
    w = layer.dequantized().double()
    xs = _x_quantized_per_group(x) if rounded and native.i8_rounds_activations(k) else x.double()
    ref = xs @ w.t() + lin.bias.double()
    got = native.i8_matmul(x, layer.weight_int8, layer.scale, layer.bias, rounded=rounded)
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    full = x.double() @ w.t() + lin.bias.double()
    assert (got.double() - full).abs().max() <= 0.03 * full.abs().max()


@needs_kernels
def test_a_row_gets_the_same_result_whatever_rows_share_its_call():
    """The engine's batch invariance rests on this: one row's output does not depend on the others."""
    torch.manual_seed(0)
    layer = Int4Linear(nn.Linear(576, 300))
    head = Int8Linear(nn.Linear(576, 300))
    x = torch.randn(9, 576)
    together = native.q4_matmul(x, layer.codes, layer.scale, layer.minimum, None)
    heads = [native.i8_matmul(x, head.weight_int8, head.scale, None, rounded=r) for r in (False, True)]
    for i in range(9):
        alone = native.q4_matmul(x[i:i + 1], layer.codes, layer.scale, layer.minimum, None)
        assert torch.equal(alone[0], together[i])
        for r, both in zip((False, True), heads):
            assert torch.equal(native.i8_matmul(x[i:i + 1], head.weight_int8, head.scale, None, rounded=r)[0],
                               both[i])


def test_an_int4_models_head_rounds_its_input_and_an_int8_models_does_not():
    from gptlab.inference.quantize import quantize_int8

    assert quantize_int4(_tiny_llama()).get_head().rounds_activations
    assert not quantize_int8(_tiny_llama()).get_head().rounds_activations


@needs_kernels
def test_rms_norm_kernel_equals_the_module():
    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5)
    norm.weight.data.normal_()
    x = torch.randn(2, 3, 576)
    with torch.no_grad():
        ref = norm(x)
        fast = native.use_native_norms(nn.Sequential(norm))[0]
        assert isinstance(fast, native.NativeRMSNorm)
        torch.testing.assert_close(fast(x), ref, atol=1e-5, rtol=1e-5)
    x.requires_grad_(True)  # with a gradient to record, the module's own (autograd) path runs
    fast(x).sum().backward()
    assert x.grad is not None


@needs_kernels
def test_quantized_layers_call_the_native_kernel(monkeypatch):
    calls = []
    real = native.q4_matmul
    monkeypatch.setattr(native, "q4_matmul", lambda *a: calls.append(1) or real(*a))
    model = quantize_int4(nn.Sequential(nn.Linear(64, 32)))
    with torch.no_grad():
        model(torch.randn(2, 64))
    assert calls


def _kernels_in_subprocess(env: dict) -> str:
    code = "from gptlab.inference import native; print(native.kernels() is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                         check=True)
    return out.stdout.strip()


def test_gptlab_native_0_turns_the_kernels_off():
    assert _kernels_in_subprocess({"GPTLAB_NATIVE": "0"}) == "True"


def test_no_compiler_means_pytorchs_kernels_not_an_error(tmp_path):
    """A machine without a C compiler loses speed, not function: kernels() is None and layers still run."""
    env = {"CC": str(tmp_path / "no-such-cc"), "GPTLAB_CACHE": str(tmp_path / "cache")}
    assert _kernels_in_subprocess(env) == "True"
    code = ("import torch, torch.nn as nn; from gptlab.inference.quantize import quantize_int4; "
            "m = quantize_int4(nn.Sequential(nn.Linear(64, 32)));\n"
            "with torch.no_grad(): print(tuple(m(torch.randn(2, 64)).shape))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    assert out.stdout.strip() == "(2, 32)"
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-built left behind


def _tiny_llama(**kw):
    from gptlab.models import build_model
    from gptlab.models.llama import LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**dict(vocab_size=300, emb_dim=128, n_heads=4, n_kv_heads=2, n_layers=2, hidden_dim=256,
                                context_length=128), **kw})
    return build_model(cfg).eval()


@needs_kernels
@pytest.mark.parametrize("scheme,kw", [("int4", {}), ("int8", {}), ("int4", {"qkv_bias": True}),
                                       ("int4", {"mlp_act": "gelu_tanh"}), ("int4", {"n_heads": 16, "n_kv_heads": 1}),
                                       ("int4", {"hidden_dim": 200})],
                         ids=["int4", "int8", "int4-qkv-bias", "int4-gelu", "int4-kv-rows-8", "int4-hidden-200"])
def test_native_decoder_layer_equals_the_modules_own_forward(scheme, kw):
    """Rows in other slots at different positions, one new token each: same output and cache as the modules."""
    from gptlab.inference.quantize import apply_quantization
    from gptlab.models.attention import SlotCache, rope_cos_sin

    model = _tiny_llama(**kw)
    if kw.get("qkv_bias"):
        for layer in model.layers:
            for p in (layer.self_attn.q_proj.bias, layer.self_attn.k_proj.bias, layer.self_attn.v_proj.bias):
                p.data.normal_()
    apply_quantization(model, scheme)
    layer = model.layers[1]
    assert isinstance(layer, native.NativeDecoderLayer)
    cfg = model.cfg
    caches = [SlotCache(1, 3, cfg.n_kv_heads, 40, cfg.head_dim, dtype=torch.float32, device="cpu") for _ in range(2)]
    torch.manual_seed(1)
    caches[0].k[0].normal_(), caches[0].v[0].normal_()
    caches[1].k[0].copy_(caches[0].k[0]), caches[1].v[0].copy_(caches[0].v[0])
    x = torch.randn(2, 1, cfg.emb_dim)
    slots, pos = torch.tensor([2, 0]), torch.tensor([[5], [17]])
    cos, sin = rope_cos_sin(model.inv_freq, pos, torch.float32)
    with torch.no_grad():
        fast = layer(x, cos, sin, caches[0].rows(slots, pos), 0)
        slow = native.DecoderLayer.forward(layer, x, cos, sin, caches[1].rows(slots, pos), 0)
    # one rounding step of an int8 activation (int4's integer path) moves an output by ~1e-3 of its range
    tol = 2e-3 if scheme == "int4" else 1e-4
    assert (fast - slow).abs().max() <= tol * slow.abs().max()
    assert (caches[0].k[0] - caches[1].k[0]).abs().max() <= tol * caches[1].k[0].abs().max()
    torch.testing.assert_close(caches[0].v[0], caches[1].v[0], atol=tol * 5, rtol=0)


@needs_kernels
def test_engine_tokens_with_native_layers_match_exact_activations_and_per_op_layers():
    """Greedy tokens from the engine: native decoder layers with float activations = the per-op modules."""
    from gptlab.inference.engine import Engine
    from gptlab.inference.quantize import quantize_int4
    from gptlab.inference.requests import Request

    model = quantize_int4(_tiny_llama())
    for layer in model.layers:  # a random model's logits are flat: sharpen them so greedy has a margin
        layer.mlp.down_proj.scale.mul_(8)
    prompts = [[1, 5, 9, 33, 70, 2], [4, 4, 4], list(range(10, 40))]

    def tokens():
        engine = Engine(model, max_batch=3, max_len=80)
        handles = [engine.submit(Request(p, max_tokens=12)) for p in prompts]
        list(engine.run())
        return [h.tokens for h in handles]

    was = native.set_int4_activations("float")
    try:
        with torch.no_grad():
            fast = tokens()
            for layer in model.layers:
                layer.__class__ = native.DecoderLayer
            slow = tokens()
    finally:
        native.set_int4_activations(was)
    assert fast == slow and len({tuple(t) for t in fast}) > 1


@needs_kernels
def test_a_ring_cache_or_a_prompt_takes_the_modules_own_path(monkeypatch):
    from gptlab.inference.quantize import quantize_int4

    model = quantize_int4(_tiny_llama(sliding_window=8))
    called = []
    monkeypatch.setattr(native, "_decode", lambda *a: called.append(1))
    from gptlab.inference.engine import Engine
    from gptlab.inference.requests import Request

    engine = Engine(model, max_batch=1, max_len=40)
    engine.submit(Request([1, 2, 3, 4], max_tokens=3))
    with torch.no_grad():
        list(engine.run())
    assert not called  # the window (8) is shorter than the cache (40): a ring, which only the modules handle


def _step_logits(model, steps: int = 6):
    """The logits of a few batched decode steps of the engine (3 prompts of different lengths)."""
    from gptlab.inference.engine import Engine
    from gptlab.inference.requests import Request

    engine = Engine(model, max_batch=3, max_len=60)
    seen = []
    head = model.get_head()
    hook = head.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    try:
        for p in ([1, 5, 9, 33, 70, 2], [4, 4, 4], list(range(10, 30))):
            engine.submit(Request(p, max_tokens=steps))
        with torch.no_grad():
            list(engine.run())
    finally:
        hook.remove()
    return seen


@needs_kernels
def test_a_decode_step_is_one_native_call_for_every_layer_with_the_same_result(monkeypatch):
    """The stack's single call (gptlab_decode_layers) = one native call per layer, bit for bit."""
    model = quantize_int4(_tiny_llama())
    assert isinstance(model.layers, native.NativeLayerStack)
    calls = []
    real = native._decode
    monkeypatch.setattr(native, "_decode", lambda *a: calls.append(a[1] is None) or real(*a))
    fused = _step_logits(model)
    assert calls and all(calls)  # every decode step went through the stack's one call
    calls.clear()
    model.layers.__class__ = nn.ModuleList  # the model's own loop: each native layer called by itself
    per_layer = _step_logits(model)
    assert calls and not any(calls)
    assert len(fused) == len(per_layer) and all(torch.equal(a, b) for a, b in zip(fused, per_layer))


@needs_kernels
def test_a_replaced_weight_rebuilds_the_native_plan():
    """The kernels hold pointers into the layers' tensors: a tensor swapped for another is seen at the next step."""
    model = quantize_int4(_tiny_llama())
    before = _step_logits(model)
    down = model.layers[1].mlp.down_proj
    down.scale = down.scale * 4  # a new tensor in the buffer's place
    after = _step_logits(model)
    for layer in model.layers:  # the modules' own forward on the same weights
        layer.__class__ = native.DecoderLayer
    model.layers.__class__ = nn.ModuleList
    reference = _step_logits(model)
    assert not torch.allclose(before[-1], after[-1])
    for a, r in zip(after, reference):
        assert (a - r).abs().max() <= 2e-2 * r.abs().max()


def _modules_own_forward(model):
    """The same model with the native layers and stack switched back to the modules' own forward."""
    for layer in model.layers:
        layer.__class__ = native.DecoderLayer
    model.layers.__class__ = nn.ModuleList
    return model


@needs_kernels
def test_weights_written_in_place_rebuild_the_native_plan():
    """``load_state_dict`` writes into the same tensors: the plans (and any packed copy) must see it."""
    model = quantize_int4(_tiny_llama())
    other = quantize_int4(_tiny_llama(n_layers=2, vocab_size=300).apply(_scramble))
    before = _step_logits(model)
    model.load_state_dict(other.state_dict())
    after = _step_logits(model)
    reference = _step_logits(other)
    assert not torch.allclose(before[-1], after[-1])
    for a, r in zip(after, reference):
        torch.testing.assert_close(a, r)


def _scramble(m):
    if isinstance(m, nn.Linear):
        with torch.no_grad():
            m.weight.mul_(-1.5)


@needs_kernels
def test_a_parameter_whose_storage_moves_rebuilds_the_native_plan():
    """``p.data = ...`` keeps the Parameter object (its id) but moves its memory: the plan must follow."""
    model = quantize_int4(_tiny_llama())
    before = _step_logits(model)
    norm = model.layers[0].post_attention_layernorm.weight
    norm.data = norm.data * 3  # same Parameter, new storage; the old one is freed
    after = _step_logits(model)
    reference = _step_logits(_modules_own_forward(model))
    assert not torch.allclose(before[-1], after[-1])
    for a, r in zip(after, reference):
        assert (a - r).abs().max() <= 2e-2 * r.abs().max()


@needs_kernels
def test_a_model_that_decoded_natively_can_be_deep_copied_and_pickled():
    import copy
    import io

    model = quantize_int4(_tiny_llama())
    first = _step_logits(model)
    assert "_native_plan" in model.layers[0].__dict__
    twin = copy.deepcopy(model)  # ctypes structs with pointers cannot be copied: the plan stays behind
    torch.save(model, io.BytesIO())
    assert all("_native_plan" not in layer.__dict__ for layer in twin.layers)
    again = _step_logits(twin)  # the copy builds its own plan, pointing into its own tensors
    assert len(first) == len(again) and all(torch.equal(a, b) for a, b in zip(first, again))


@needs_kernels
def test_forward_hooks_on_a_layer_still_fire_during_decode_steps(monkeypatch):
    """The stack's single native call would skip the layers' hooks: with a hook it steps layer by layer."""
    model = quantize_int4(_tiny_llama())
    stack_calls = []
    real = native._decode
    monkeypatch.setattr(native, "_decode", lambda *a: stack_calls.append(a[1] is None) or real(*a))
    seen = []
    handle = model.layers[1].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    try:
        hooked = _step_logits(model, steps=4)
    finally:
        handle.remove()
    assert seen.count(1) >= 3  # the decode steps (one new token per row) went through the hooked layer
    assert stack_calls and not any(stack_calls)  # ... one native call per layer, not the stack's one
    stack_calls.clear()
    plain = _step_logits(model, steps=4)
    assert stack_calls and all(stack_calls)
    assert all(torch.equal(a, b) for a, b in zip(hooked, plain))


@needs_kernels
def test_the_stack_arrays_live_on_the_cache_and_go_with_it():
    """The stack's pointer arrays into a cache's k/v buffers are kept by that cache, not by the model."""
    import gc
    import weakref

    from gptlab.inference.engine import Engine
    from gptlab.inference.requests import Request

    model = quantize_int4(_tiny_llama())
    engine = Engine(model, max_batch=2, max_len=40)
    engine.submit(Request([1, 2, 3], max_tokens=4))
    with torch.no_grad():
        list(engine.run())
    stores = [o for o in vars(engine).values() if hasattr(o, "__dict__") and "_native_stack" in vars(o)]
    assert len(stores) == 1 and "_native_stack" not in model.layers.__dict__
    k0 = weakref.ref(stores[0].k[0])
    del engine, stores
    gc.collect()
    assert k0() is None  # nothing in the model keeps the cache's buffers alive


def _decoding_engine(model, prompts, max_tokens=40):
    from gptlab.inference.engine import Engine
    from gptlab.inference.requests import Request

    engine = Engine(model, max_batch=3, max_len=80)
    handles = [engine.submit(Request(p, max_tokens=max_tokens)) for p in prompts]
    with torch.no_grad():
        while not all(len(h.tokens) >= 2 for h in handles):  # past prefill: decode steps on the stack plan
            engine.step()
    stores = [o for o in vars(engine).values() if hasattr(o, "__dict__") and "_native_stack" in vars(o)]
    assert len(stores) == 1
    return engine, stores[0]


@needs_kernels
def test_a_weight_replaced_mid_batch_is_used_from_the_next_full_check():
    """Between full checks a step checks only the layer objects; a weight swapped while the same batch
    decodes is picked up within FULL_CHECK_EVERY steps, and the old tensor stays alive until then."""
    model = quantize_int4(_tiny_llama())
    engine, store = _decoding_engine(model, [[1, 5, 9, 33], [4, 4, 4]])
    first = store.__dict__["_native_stack"]
    down = model.layers[1].mlp.down_proj
    old_scale = down.scale
    down.scale = old_scale * 4  # a new tensor in the buffer's place
    plans = []
    with torch.no_grad():
        for _ in range(native.FULL_CHECK_EVERY):
            engine.step()
            plans.append(store.__dict__["_native_stack"])
    assert plans[-1] is not first  # rebuilt within FULL_CHECK_EVERY steps
    assert any(t is down.scale for t in plans[-1].held) and not any(t is old_scale for t in plans[-1].held)
    assert any(t is old_scale for t in first.held)  # the old plan kept what it pointed at alive


@needs_kernels
def test_a_request_joining_the_batch_runs_the_full_check_at_once():
    """Weights swapped between requests are seen by the first step after the new one joins."""
    from gptlab.inference.requests import Request

    model = quantize_int4(_tiny_llama())
    engine, store = _decoding_engine(model, [[1, 5, 9, 33]])
    with torch.no_grad():
        engine.step()  # a full check just ran (or is not due): the same plan
    first = store.__dict__["_native_stack"]
    norm = model.layers[0].post_attention_layernorm.weight
    old_ptr = norm.data_ptr()
    norm.data = norm.data * 3  # same Parameter, new storage: the old one is pinned by the plan, not freed
    assert old_ptr in [s.data_ptr() for s in first.pinned]
    handle = engine.submit(Request([7, 8, 9], max_tokens=5))
    with torch.no_grad():
        while not handle.tokens:
            engine.step()
        engine.step()  # the first decode step with both rows
    now = store.__dict__["_native_stack"]
    assert now is not first and norm.data_ptr() in [p[0] if isinstance(p, tuple) else p for p in now.ptrs]
