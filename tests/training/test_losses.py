"""The chunked head + cross-entropy equals the plain logits path (loss and gradients); the padded head
is masked; the loop's language-modeling task uses it, and falls back where the head is not plain."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.models import build_model, get_preset
from gptlab.training import LanguageModeling, TrainConfig
from gptlab.training.losses import chunk_rows_for, chunked_cross_entropy, lm_cross_entropy, padded_size, plain_head


def _inputs(dtype, N=300, d=32, V=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, N // 2, d, dtype=dtype, generator=g).requires_grad_()
    w = torch.randn(V, d, dtype=dtype, generator=g).requires_grad_()
    y = torch.randint(0, V, (2, N // 2), generator=g)
    y[0, :7] = -100  # rows without a target are ignored, as F.cross_entropy's ignore_index
    y[1, -3:] = -100
    return h, w, y


def _plain(h, w, y, upcast=True):
    logits = h @ w.T
    return F.cross_entropy((logits.float() if upcast else logits).flatten(0, 1), y.flatten(), ignore_index=-100)


@pytest.mark.parametrize("chunk", [64, 100, 1000])
@pytest.mark.parametrize("multiple", [1, 64])
def test_equals_plain_path_in_float64(chunk, multiple):
    h, w, y = _inputs(torch.float64)
    ref = _plain(h, w, y, upcast=False)
    ref_grads = torch.autograd.grad(ref, (h, w))
    out = chunked_cross_entropy(h, w, y, chunk_rows=chunk, vocab_multiple=multiple)
    grads = torch.autograd.grad(out, (h, w))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        assert a.shape == b.shape  # the padded rows' gradient never reaches the (V, d) weight
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_equals_plain_path_in_float32_and_scales_with_the_incoming_gradient():
    h, w, y = _inputs(torch.float32)
    ref = _plain(h, w, y) * 0.25  # e.g. the loop's loss / grad_accum
    ref_grads = torch.autograd.grad(ref, (h, w))
    out = chunked_cross_entropy(h, w, y, chunk_rows=64) * 0.25
    grads = torch.autograd.grad(out, (h, w))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_matches_plain_autocast_path():
    h, w, y = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _plain(h, w, y)
        out = chunked_cross_entropy(h, w, y, chunk_rows=64)
    ref_grads = torch.autograd.grad(ref, (h, w))
    grads = torch.autograd.grad(out, (h, w))
    assert out.dtype == torch.float32 and grads[1].dtype == torch.float32  # fp32 master weight's gradient
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_padding_changes_nothing_and_sizes_round_up():
    h, w, y = _inputs(torch.float64, V=1000)
    a = chunked_cross_entropy(h, w, y, vocab_multiple=1)
    b = chunked_cross_entropy(h, w, y, vocab_multiple=64)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert padded_size(50257, 64) == 50304 and padded_size(50304, 64) == 50304 and padded_size(7, 1) == 7
    assert chunk_rows_for(50257) == 1280 and chunk_rows_for(10**9) == 64


def test_no_target_row_gives_nan_like_plain():
    h, w, y = _inputs(torch.float32)
    y[:] = -100
    assert torch.isnan(chunked_cross_entropy(h, w, y)) and torch.isnan(_plain(h, w, y))


def _nano(vocab=97, dtype=torch.float64):
    torch.manual_seed(0)
    return build_model(get_preset("gpt2-nano").replace(vocab_size=vocab, context_length=16, drop_rate=0.0)).to(dtype)


def test_model_loss_and_every_parameter_gradient_equal_the_logits_path():
    model = _nano()
    x = torch.randint(0, 97, (3, 16))
    y = torch.randint(0, 97, (3, 16))
    ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    out = lm_cross_entropy(model, x, y, chunk_rows=20, vocab_multiple=64)
    grads = torch.autograd.grad(out, list(model.parameters()))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


def test_task_uses_chunks_by_default_and_falls_back_for_other_heads():
    model = _nano(dtype=torch.float32)
    batch = (torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16)))
    assert plain_head(model) is model.get_head().weight
    chunked = LanguageModeling().loss(model, batch)
    plain = LanguageModeling(chunked=False).loss(model, batch)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    model.set_head(nn.Linear(model.cfg.emb_dim, 97, bias=True))  # not a plain bias-free head: the logits path
    assert plain_head(model) is None
    torch.testing.assert_close(LanguageModeling().loss(model, batch), LanguageModeling(chunked=False).loss(model, batch))
    assert plain_head(nn.Linear(3, 3)) is None  # not a gptlab language model


def test_vocab_multiple_is_validated():
    with pytest.raises(GptlabError, match="vocab_multiple=0 must be >= 1"):
        TrainConfig(max_steps=1, vocab_multiple=0).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_chunked_matches_plain():
    h, w, y = (t.cuda() for t in _inputs(torch.float32))
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = _plain(h, w, y)
        out = chunked_cross_entropy(h, w, y, chunk_rows=64, vocab_multiple=64)
    ref_grads = torch.autograd.grad(ref, (h, w))
    grads = torch.autograd.grad(out, (h, w))
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_without_grad_the_loss_is_the_same():
    h, w, y = _inputs(torch.float32)
    with torch.no_grad():
        a = chunked_cross_entropy(h, w, y, chunk_rows=64)
    torch.testing.assert_close(a, chunked_cross_entropy(h, w, y, chunk_rows=64).detach())
