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
    # even group counts take the integer path: scale·code meets x rounded to int8 per group, the
    # minimum meets the exact sum of x; odd counts (and CPUs without VNNI) take the float path
    integer = (k // 32) % 2 == 0 and native.kernels().gptlab_kernels_isa() == 3
    xs = _x_quantized_per_group(x) if integer else x.double()
    ref = xs @ (w - mins).t() + x.double() @ mins.t() + lin.bias.double()
    got = native.q4_matmul(x, layer.codes, layer.scale, layer.minimum, layer.bias)
    # float32 accumulation is all that remains
    assert (got.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    full = x.double() @ w.t() + lin.bias.double()  # and near the unquantized activations (~1%)
    assert (got.double() - full).abs().max() <= 0.03 * full.abs().max()


@needs_kernels
@pytest.mark.parametrize("m,n,k", SHAPES + [(2, 33, 50)])
def test_int8_kernel_equals_its_formula(m, n, k):
    torch.manual_seed(m + n * k)
    lin = nn.Linear(k, n)
    layer = Int8Linear(lin)
    x = torch.randn(m, k)
    ref = x.double() @ layer.dequantized().double().t() + lin.bias.double()
    got = native.i8_matmul(x, layer.weight_int8, layer.scale, layer.bias)
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@needs_kernels
def test_a_row_gets_the_same_result_whatever_rows_share_its_call():
    """The engine's batch invariance rests on this: one row's output does not depend on the others."""
    torch.manual_seed(0)
    layer = Int4Linear(nn.Linear(576, 300))
    x = torch.randn(7, 576)
    together = native.q4_matmul(x, layer.codes, layer.scale, layer.minimum, None)
    for i in range(7):
        alone = native.q4_matmul(x[i:i + 1], layer.codes, layer.scale, layer.minimum, None)
        assert torch.equal(alone[0], together[i])


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
