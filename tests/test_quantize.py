"""Weight-only int8: the kernel equals its own dequantized weights, and models stay close to fp32."""

import pytest
import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.generation import generate
from gptlab.models import build_model, get_preset
from gptlab.quantize import Int8Linear, _KERNEL_OK, apply_quantization, quantize_int8


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
    with pytest.raises(GptlabError, match="unknown quantization 'int4'"):
        apply_quantization(model, "int4")
