"""The native causal attention (models/gpt2_kernels.c) against PyTorch's SDPA, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptlab.models import build_model, fused_attention, fused_gelu, gpt2_kernels
from gptlab.models.gpt2 import GPT2Config

needs_kernel = pytest.mark.skipif(not fused_attention.usable(torch.zeros(1, 1, 96), 4),
                                  reason="the native attention cannot be built or used on this CPU")


def sdpa_reference(qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What GPT-2's attention computes without the kernel: split, heads, causal SDPA, heads side by side."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.view(B, T, n_heads, C // n_heads).transpose(1, 2) for t in qkv.split(C, dim=-1))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)


SHAPES = [(12, 64, 4, 32), (2, 7, 3, 8), (1, 1, 2, 16), (3, 100, 2, 64), (2, 33, 5, 16), (1, 128, 1, 40),
          (2, 256, 2, 32), (1, 512, 1, 64), (1, 301, 2, 24)]


@pytest.fixture(params=["build", "avx2"])
def kernel_build(request, monkeypatch):
    """The kernels as this machine builds them, and their AVX2 code (built with -mno-avx512f) where the
    machine's own build is AVX-512: both vector widths are tested on an AVX-512 CPU."""
    lib = gpt2_kernels.kernels()
    if request.param == "avx2":
        if lib.gptlab_attention_lanes() == 8:
            pytest.skip("this machine's build is the AVX2 one already")
        lib = gpt2_kernels.build(["-mno-avx512f"])
        assert lib is not None and lib.gptlab_attention_lanes() == 8
        monkeypatch.setattr(fused_attention, "_kernels", lambda: lib)
    return lib


@needs_kernel
@pytest.mark.parametrize("B,T,H,D", SHAPES)
def test_forward_and_gradients_equal_sdpa_in_float64(B, T, H, D, kernel_build):
    g = torch.Generator().manual_seed(B * 1000 + T)
    qkv = (torch.randn(B, T, 3 * H * D, generator=g) * 2).requires_grad_()
    up = torch.randn(B, T, H * D, generator=g)
    out = fused_attention.packed_causal_attention(qkv, H)
    (grad,) = torch.autograd.grad(out, qkv, up)
    qkv64 = qkv.detach().double().requires_grad_()
    ref = sdpa_reference(qkv64, H)
    (ref_grad,) = torch.autograd.grad(ref, qkv64, up.double())
    assert out.shape == (B, T, H * D)
    torch.testing.assert_close(out.double(), ref, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-4 * ref_grad.abs().max().item(), rtol=1e-4)
    assert (grad[..., : H * D].abs().sum() > 0) and (grad[..., 2 * H * D:].abs().sum() > 0)  # dq and dv written


@needs_kernel
def test_a_future_token_never_changes_an_earlier_output(kernel_build):
    qkv = torch.randn(2, 20, 3 * 64)
    changed = qkv.clone()
    changed[:, 12:] += torch.randn(2, 8, 3 * 64)
    a = fused_attention.packed_causal_attention(qkv, 2)
    b = fused_attention.packed_causal_attention(changed, 2)
    assert torch.equal(a[:, :12], b[:, :12]) and not torch.allclose(a[:, 12:], b[:, 12:])


@needs_kernel
def test_gpt2_training_step_takes_the_kernel_and_matches_sdpa(monkeypatch):
    cfg = GPT2Config(vocab_size=65, context_length=64, emb_dim=128, n_layers=2, n_heads=4, drop_rate=0.0)
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.randint(0, 65, (3, 50))
    calls = []
    real = fused_attention.packed_causal_attention
    monkeypatch.setattr(fused_attention, "packed_causal_attention", lambda *a: calls.append(1) or real(*a))
    logits = model(x)
    logits.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert len(calls) == 2  # one per layer
    model.zero_grad()
    monkeypatch.setattr(fused_attention, "preferred", lambda *a: False)  # the SDPA path
    ref = model(x)
    ref.square().mean().backward()
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_inputs_the_kernel_does_not_take_go_to_sdpa():
    assert not fused_attention.usable(torch.zeros(1, 8, 3 * 2 * 12), 2)  # head width 12: not a multiple of 8
    assert not fused_attention.usable(torch.zeros(1, 8, 3 * 2 * 72), 2)  # head width 72: more than 64
    assert not fused_attention.usable(torch.zeros(1, fused_attention.MAX_CONTEXT + 1, 96), 4)
    assert not fused_attention.usable(torch.zeros(1, 8, 96, dtype=torch.bfloat16), 4)
    assert not fused_attention.usable(torch.zeros(1, 8, 100), 4)  # 100 does not split into 3 x 4 heads
    assert not fused_attention.usable(torch.zeros(1, 8, 96), 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_attention.usable(torch.zeros(1, 8, 96), 4)
    with pytest.raises(ValueError, match="use SDPA"):
        fused_attention.packed_causal_attention(torch.zeros(1, 8, 3 * 2 * 12), 2)


@needs_kernel
def test_the_kernel_is_preferred_wherever_it_is_usable(monkeypatch):
    assert fused_attention.preferred(torch.zeros(1, 8, 96), 4)
    assert not fused_attention.preferred(torch.zeros(1, 8, 3 * 2 * 12), 2)
    calls = []
    monkeypatch.setattr(fused_attention, "packed_causal_attention", lambda *a: calls.append(1) or torch.zeros(2, 16, 64))
    model = build_model(GPT2Config(vocab_size=50, context_length=32, emb_dim=64, n_layers=1, n_heads=2, drop_rate=0.0))
    model(torch.randint(0, 50, (2, 16)))
    assert calls == [1]
    monkeypatch.setattr(fused_attention, "usable", lambda *a: False)
    assert not fused_attention.preferred(torch.zeros(1, 8, 96), 4)


def test_gpt2_with_attention_dropout_keeps_sdpa(monkeypatch):
    """Attention dropout is SDPA's: the kernel is never asked for it."""
    monkeypatch.setattr(fused_attention, "packed_causal_attention",
                        lambda *a: pytest.fail("the native attention ran with dropout on"))
    model = build_model(GPT2Config(vocab_size=50, context_length=32, emb_dim=64, n_layers=1, n_heads=2,
                                   drop_rate=0.1)).train()
    model(torch.randint(0, 50, (2, 16)))


def test_no_native_code_means_sdpa(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTLAB_NATIVE", "0")
    monkeypatch.setattr(gpt2_kernels, "_lib", None)
    assert not fused_attention.usable(torch.zeros(1, 8, 96), 4)
    assert not fused_gelu.usable(torch.zeros(8))
    model = build_model(GPT2Config(vocab_size=50, context_length=32, emb_dim=64, n_layers=1, n_heads=2))
    assert model(torch.randint(0, 50, (2, 16))).shape == (2, 16, 50)


@needs_kernel
def test_a_nan_in_a_key_reaches_the_outputs_that_see_it_as_sdpa_does(kernel_build):
    qkv = torch.randn(1, 10, 3 * 32)
    qkv[0, 4, 32 + 3] = float("nan")  # key 4, head 0
    out = fused_attention.packed_causal_attention(qkv, 2)
    ref = sdpa_reference(qkv, 2)
    assert torch.equal(out.isnan(), ref.isnan()) and out[0, 4:, :16].isnan().all() and not out[0, :4].isnan().any()


@needs_kernel
def test_second_derivatives_raise_rather_than_come_out_zero():
    qkv = torch.randn(1, 8, 96, requires_grad=True)
    (grad,) = torch.autograd.grad(fused_attention.packed_causal_attention(qkv, 2).sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|differentiable"):
        grad.sum().backward()


@needs_kernel
def test_an_empty_batch_and_torch_compile_take_sdpa_or_return_empty(monkeypatch):
    empty = torch.zeros(0, 8, 96, requires_grad=True)
    out = fused_attention.packed_causal_attention(empty, 2)
    out.sum().backward()
    assert out.shape == (0, 8, 32) and empty.grad.shape == empty.shape
    calls = []
    real = fused_attention.packed_causal_attention
    monkeypatch.setattr(fused_attention, "packed_causal_attention", lambda *a: calls.append(1) or real(*a))
    model = build_model(GPT2Config(vocab_size=50, context_length=32, emb_dim=64, n_layers=1, n_heads=2)).eval()
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        eager = model(x)
        assert calls == [1]
        compiled = torch.compile(model, backend="eager", fullgraph=True)(x)  # no graph break for the ctypes call
    assert calls == [1]
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
