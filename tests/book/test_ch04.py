"""Chapter 4 as a learner runs it: the building blocks, the 124M model, greedy generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.book import (GELU, GPT_CONFIG_124M, FeedForward, GPTModel, LayerNorm, TransformerBlock,
                         book_to_gptlab, generate_text_simple, model_configs)
from gptlab.errors import GptlabError
from gptlab.models.gpt2 import GPT2Config


def test_layernorm_and_gelu_match_pytorch():
    torch.manual_seed(123)
    x = torch.randn(2, 5, 8)
    ln = LayerNorm(8)
    with torch.no_grad():
        ln.scale.uniform_()
        ln.shift.uniform_()
    ref = nn.LayerNorm(8)
    ref.load_state_dict({"weight": ln.scale, "bias": ln.shift})
    assert torch.allclose(ln(x), ref(x), atol=1e-6)
    out = LayerNorm(8)(x)
    assert torch.allclose(out.mean(-1), torch.zeros(2, 5), atol=1e-6)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-4)
    g = torch.linspace(-3, 3, 100)
    assert torch.allclose(GELU()(g), F.gelu(g, approximate="tanh"), atol=1e-6)


def test_feed_forward_and_block_keep_the_shape():
    cfg = dict(GPT_CONFIG_124M, emb_dim=16, n_heads=2, context_length=8)
    x = torch.rand(2, 4, 16)
    assert FeedForward(cfg)(x).shape == (2, 4, 16)
    assert FeedForward(cfg).layers[0].out_features == 64
    assert TransformerBlock(cfg)(x).shape == (2, 4, 16)


def test_parameter_counts_of_the_course():
    with torch.device("meta"):  # shapes only: no memory, no time
        m1024 = GPTModel(dict(GPT_CONFIG_124M, context_length=1024))
        m256 = GPTModel(GPT_CONFIG_124M)
    assert sum(p.numel() for p in m1024.parameters()) == 163_009_536
    assert sum(p.numel() for p in m256.parameters()) == 162_419_712
    # "124M" counts the output head as tied to the token embedding.
    assert sum(p.numel() for p in m1024.parameters()) - m1024.out_head.weight.numel() == 124_412_160
    # gptlab's config computes the same number without building anything.
    cfg = GPT2Config(context_length=1024, qkv_bias=False, tie_embeddings=False)
    assert cfg.param_counts()["total"] == 163_009_536
    medium = dict(GPT_CONFIG_124M, context_length=1024, **model_configs["gpt2-medium (355M)"])
    with torch.device("meta"):
        assert sum(p.numel() for p in GPTModel(medium).parameters()) == GPT2Config(
            context_length=1024, emb_dim=1024, n_layers=24, n_heads=16, qkv_bias=False,
            tie_embeddings=False).param_counts()["total"]


def test_seeded_untrained_model_generates_the_course_text(tokenizer):
    torch.manual_seed(123)
    model = GPTModel(dict(GPT_CONFIG_124M, context_length=1024))
    model.eval()
    encoded = torch.tensor(tokenizer.encode("Hello, I am")).unsqueeze(0)
    out = generate_text_simple(model, encoded, max_new_tokens=6, context_size=1024)
    assert out.tolist() == [[15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348, 7267]]
    assert tokenizer.decode(out[0].tolist()) == "Hello, I am Featureiman Byeswickattribute argue"


def test_greedy_generation_equals_gptlab_generate(tiny_cfg):
    from gptlab.inference.generation import generate as gptlab_generate

    torch.manual_seed(0)
    model = GPTModel(dict(tiny_cfg, vocab_size=500)).eval()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    ours = generate_text_simple(model, idx, max_new_tokens=40, context_size=tiny_cfg["context_length"])
    full = gptlab_generate(book_to_gptlab(model), idx, 40)  # KV cache, context overflow handled
    assert torch.equal(ours, full)


def test_bad_configs_and_inputs_are_explained(tiny_cfg):
    with pytest.raises(GptlabError, match="config lacks qkv_bias"):
        GPTModel({k: v for k, v in tiny_cfg.items() if k != "qkv_bias"})
    with pytest.raises(GptlabError, match="emb_dim=30 must be divisible by n_heads=4"):
        GPTModel(dict(tiny_cfg, emb_dim=30))
    with pytest.raises(GptlabError, match="drop_rate=1.5"):
        GPTModel(dict(tiny_cfg, drop_rate=1.5))
    model = GPTModel(tiny_cfg)
    with pytest.raises(GptlabError, match="input has 40 tokens but context_length is 32"):
        model(torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(GptlabError, match="unsqueeze"):
        generate_text_simple(model, torch.tensor([1, 2]), 3, 32)
