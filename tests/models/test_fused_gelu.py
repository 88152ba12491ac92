"""The native GELU (models/gpt2_kernels.c) against a float64 reference and F.gelu, forward and backward."""

import math

import pytest
import torch
import torch.nn.functional as F

from gptlab.models import build_model, fused_gelu
from gptlab.models.gpt2 import GPT2Config

needs_kernel = pytest.mark.skipif(not fused_gelu.usable(torch.zeros(1)),
                                  reason="the native GELU needs a C compiler and an AVX2 CPU")


def _reference(x: torch.Tensor):
    """(gelu(x), gelu'(x)) of GPT-2's tanh form, in float64 from the formulas."""
    x = x.double()
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
    phi = 0.5 * (1 + torch.tanh(u))
    dphi = 0.5 * (1 - torch.tanh(u) ** 2) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x * x)
    return x * phi, phi + x * dphi


# values over the whole range (tails included) and a length that is not a multiple of 8 or of a chunk
X = torch.cat([torch.linspace(-30, 30, 2001), torch.randn(3 * 4096 + 5) * 3, torch.tensor([0.0, -0.0, 1e-30])])


@needs_kernel
def test_forward_and_backward_equal_the_formula_and_torch():
    approximate = "tanh"
    x = X.clone().requires_grad_(True)
    y = fused_gelu.gelu(x, approximate)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    ref_y, ref_d = _reference(X)
    # absolute error against the float64 formula: a few float32 steps of the value's size
    assert ((y.double() - ref_y).abs() <= 4e-7 * ref_y.abs().clamp_min(1) + 1e-30).all()
    assert ((dx.double() - dy.double() * ref_d).abs() <= 1e-6 * (dy.double().abs() + 1)).all()
    # and PyTorch's own F.gelu to float rounding, both ways
    xt = X.clone().requires_grad_(True)
    yt = F.gelu(xt, approximate=approximate)
    (dxt,) = torch.autograd.grad(yt, xt, dy)
    torch.testing.assert_close(y, yt, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dx, dxt, atol=1e-5, rtol=1e-5)


def test_the_exact_gelu_is_torchs_own(monkeypatch):
    """The erf form goes to F.gelu (a native erf form was not faster): bit for bit, the kernel never asked."""
    monkeypatch.setattr(fused_gelu._Gelu, "apply", lambda *a: pytest.fail("the native GELU ran for the erf form"))
    x = X.clone()
    assert torch.equal(fused_gelu.gelu(x), F.gelu(x)) and torch.equal(fused_gelu.gelu(x, "none"), F.gelu(x))


@needs_kernel
def test_nan_inf_and_extremes():
    """NaN stays NaN, +inf stays +inf and far-out values equal F.gelu's (x, or 0 on the left)."""
    x = torch.tensor([float("nan"), float("inf"), 100.0, -100.0, 1e30, -1e30] + [0.5] * 3)
    got, want = fused_gelu.gelu(x, "tanh"), F.gelu(x, approximate="tanh")
    assert torch.isnan(got[0]) and got[1] == float("inf")
    torch.testing.assert_close(got[2:], want[2:], atol=1e-30, rtol=1e-6)


def test_other_inputs_go_to_torch(monkeypatch):
    """bf16, autocast or no kernels: F.gelu, the same numbers as calling it directly."""
    x = torch.randn(40)
    assert not fused_gelu.usable(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_gelu.usable(x)
    monkeypatch.setattr(fused_gelu, "kernels", lambda: None)
    assert not fused_gelu.usable(x)
    assert torch.equal(fused_gelu.gelu(x, "tanh"), F.gelu(x, approximate="tanh"))
    with pytest.raises(ValueError, match="approximate='erf' must be one of"):
        fused_gelu.gelu(x, "erf")


@needs_kernel
def test_gpt2_training_step_matches_the_torch_gelu(monkeypatch):
    """A GPT-2 forward + backward with the native GELU = the same model on F.gelu, to float rounding."""
    torch.manual_seed(0)
    model = build_model(GPT2Config(vocab_size=70, context_length=16, emb_dim=32, n_heads=2, n_layers=2,
                                   drop_rate=0.0, mlp_act="gelu_tanh"))
    ids = torch.randint(0, 70, (3, 16))
    calls = []
    real = fused_gelu._Gelu.apply
    monkeypatch.setattr(fused_gelu._Gelu, "apply", lambda *a: calls.append(1) or real(*a))

    def step():
        model.zero_grad()
        loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    native_loss, native_grads = step()
    assert len(calls) == 2  # one per layer
    monkeypatch.setattr(fused_gelu, "usable", lambda x: False)
    torch_loss, torch_grads = step()
    torch.testing.assert_close(native_loss, torch_loss, atol=1e-6, rtol=1e-6)
    for a, b in zip(native_grads, torch_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
