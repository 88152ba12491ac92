"""Weight-only int8 and int4: each kernel equals its own dequantized weights, and models stay close to fp32."""

import pytest
import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.inference.generation import generate
from gptlab.models import build_model, get_preset
from gptlab.inference.quantize import (_INT4_OK, _KERNEL_OK, Int4Linear, Int8Linear, apply_quantization, quantize_int4,
                             quantize_int8)


def test_int8_linear_matches_its_dequantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True)
    q = Int8Linear(lin)
    w = q.dequantized()
    # per-row error of the quantized weight is at most half a step
    assert ((w - lin.weight).abs() <= q.scale.float()[:, None] / 2 + 1e-6).all()
    x = torch.randn(5, 64)
    ref = x.bfloat16().float() @ w.t() + lin.bias
    assert torch.allclose(q(x), ref, rtol=2e-2, atol=2e-2)
    assert q(x.view(5, 1, 64)).shape == (5, 1, 48)


def test_fallback_path_equals_kernel_path(monkeypatch):
    torch.manual_seed(1)
    q = Int8Linear(nn.Linear(32, 16, bias=False))
    x = torch.randn(3, 32)
    fast = q(x)
    monkeypatch.setitem(_KERNEL_OK, "cpu", False)
    slow = q(x)
    assert torch.allclose(fast, slow, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("preset", ["gpt2-nano", "llama-micro"])
def test_quantized_model_stays_close_to_fp32(preset):
    torch.manual_seed(2)
    cfg = get_preset(preset).replace(vocab_size=97, context_length=32)
    model = build_model(cfg).eval()
    ids = torch.randint(0, 97, (2, 16))
    ref = model(ids)
    quantize_int8(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    out = model(ids)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.02, rel
    assert generate(model, ids[:, :4], 5).shape == (2, 9)  # cached decoding works on the int8 model


def test_skip_and_unknown_scheme():
    torch.manual_seed(3)
    model = build_model(get_preset("llama-micro").replace(vocab_size=50, context_length=16))
    quantize_int8(model, skip=("lm_head",))
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.layers[0].mlp.up_proj, Int8Linear)
    with pytest.raises(GptlabError, match="quantize='int3' is not a quantization scheme; use int4 or int8"):
        apply_quantization(model, "int3")


def test_scheme_names_ignore_case():
    torch.manual_seed(3)
    model = build_model(get_preset("llama-micro").replace(vocab_size=50, context_length=16))
    apply_quantization(model, "INT4")
    assert isinstance(model.layers[0].mlp.up_proj, Int4Linear)


def test_generate_names_the_quantize_flag_before_loading(tmp_path, capsys):
    from gptlab.cli import run
    from gptlab.tokenizers import CharTokenizer
    from gptlab.weights.native import save_model_dir

    tok = CharTokenizer.from_text("hello world")
    torch.manual_seed(0)
    save_model_dir(build_model(get_preset("llama-micro").replace(vocab_size=tok.vocab_size, context_length=16)),
                   tmp_path / "m", tok)
    # checked before the model is loaded: a missing model is not even looked at
    assert run(["generate", str(tmp_path / "missing"), "--quantize", "int3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --quantize 'int3' is not a quantization scheme; use int4 or int8")
    assert err.count("\n") == 1
    assert run(["generate", str(tmp_path / "m"), "--quantize", "INT4", "--prompt", "he", "--max-new-tokens", "3",
                "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("he")


def test_int4_linear_matches_its_dequantized_weight():
    torch.manual_seed(4)
    lin = nn.Linear(96, 40, bias=True)
    q = Int4Linear(lin, group_size=32)
    assert q.codes.shape == (40, 48) and q.codes.dtype == torch.uint8  # two codes per byte
    w = q.dequantized()
    step = q.scale.float().repeat_interleave(32, dim=1)  # (out, in)
    # each weight is within half a step (plus the bf16 rounding of the minimum) of its code's value
    assert ((w - lin.weight).abs() <= step * 0.5 + 4e-3 * lin.weight.abs().amax()).all()
    x = torch.randn(7, 96)
    ref = x.bfloat16().float() @ w.t() + lin.bias
    assert torch.allclose(q(x), ref, rtol=2e-2, atol=3e-2)
    assert q(x.view(7, 1, 96)).shape == (7, 1, 40)


def test_int4_kernel_equals_fallback(monkeypatch):
    torch.manual_seed(5)
    q = Int4Linear(nn.Linear(64, 48, bias=False))
    x = torch.randn(3, 64)
    fast = q(x)
    monkeypatch.setitem(_INT4_OK, "cpu", False)
    slow = q(x)
    assert torch.allclose(fast, slow, rtol=2e-2, atol=2e-2)


def test_int4_keeps_gguf_q4_1_blocks():
    """Weights that are already Q4_1 blocks (llama.cpp's quantizer) come back unchanged, up to bf16 scales."""
    gguf_quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    torch.manual_seed(6)
    w = torch.randn(64, 128) * 0.05
    q4 = gguf_quants.quantize(w.numpy(), GGMLQuantizationType.Q4_1)
    w_q4 = torch.from_numpy(gguf_quants.dequantize(q4, GGMLQuantizationType.Q4_1)).float()
    lin = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w_q4)
    back = Int4Linear(lin, group_size=32).dequantized()
    err = (back - w_q4).abs().max().item()
    step = (w_q4.reshape(64, 4, 32).amax(-1) - w_q4.reshape(64, 4, 32).amin(-1)).max().item() / 15
    # the same codes: only the bf16 rounding of scale and minimum (8-bit mantissas) remains
    assert err < step * 0.1, (err, step)


@pytest.mark.parametrize("preset", ["gpt2-nano", "llama-micro"])
def test_int4_model_stays_close_to_fp32(preset):
    torch.manual_seed(7)
    cfg = get_preset(preset).replace(vocab_size=97, context_length=32)
    model = build_model(cfg).eval()
    ids = torch.randint(0, 97, (2, 16))
    ref = model(ids)
    apply_quantization(model, "int4")
    head = model.lm_head if hasattr(model, "lm_head") else model.out_head
    assert isinstance(head, Int8Linear)  # the output head stays int8
    assert any(isinstance(m, Int4Linear) for m in model.modules())
    out = model(ids)
    rel = (out - ref).norm() / ref.norm()
    # random Gaussian weights are 4 bits' worst case (~8 % error per layer); the real
    # checkpoint's perplexity is checked in tests/weights/test_smollm2.py
    assert rel < 0.25, rel
    assert generate(model, ids[:, :4], 5).shape == (2, 9)


def test_int4_odd_width_falls_back_to_int8():
    model = nn.Sequential(nn.Linear(40, 16), nn.Linear(16, 64))
    quantize_int4(model, group_size=32)
    assert isinstance(model[0], Int8Linear)  # 40 inputs: not a multiple of 32
    assert isinstance(model[1], Int8Linear)  # 16 inputs


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantizing_frees_each_float_weight(scheme, monkeypatch):
    """No second copy of the model: while layer k is quantized, layers < k's float weights are gone."""
    import gc
    import weakref

    import gptlab.inference.quantize as qmod

    model = build_model(get_preset("llama-micro").replace(vocab_size=64, context_length=16, tie_embeddings=False))
    refs = [weakref.ref(m.weight) for m in model.modules() if isinstance(m, nn.Linear)]
    alive_at_each_layer = []
    for cls in (qmod.Int8Linear, qmod.Int4Linear):
        original = cls.__init__

        def spy(self, linear, *args, _original=original, **kw):
            gc.collect()
            alive_at_each_layer.append(sum(r() is not None for r in refs))
            _original(self, linear, *args, **kw)
        monkeypatch.setattr(cls, "__init__", spy)
    apply_quantization(model, scheme)
    n = len(refs)
    assert alive_at_each_layer == list(range(n, 0, -1))  # one fewer float weight alive per layer done
