"""Chapter 3 as a learner runs it: the six-token "Your journey starts with one step" example."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptlab.book import (CausalAttention, MultiHeadAttention, MultiHeadAttentionWrapper, SelfAttention_v1,
                         SelfAttention_v2)
from gptlab.errors import GptlabError

# The course's 3-d embeddings of "Your journey starts with one step".
INPUTS = torch.tensor([
    [0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
    [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55],
])


def test_self_attention_v1_and_v2_course_figures():
    torch.manual_seed(123)
    out = SelfAttention_v1(3, 2)(INPUTS)
    expected = torch.tensor([[0.2996, 0.8053], [0.3061, 0.8210], [0.3058, 0.8203],
                             [0.2948, 0.7939], [0.2927, 0.7891], [0.2990, 0.8040]])
    assert torch.allclose(out, expected, atol=1e-4)
    torch.manual_seed(789)
    out = SelfAttention_v2(3, 2)(INPUTS)
    expected = torch.tensor([[-0.0739, 0.0713], [-0.0748, 0.0703], [-0.0749, 0.0702],
                             [-0.0760, 0.0685], [-0.0763, 0.0679], [-0.0754, 0.0693]])
    assert torch.allclose(out, expected, atol=1e-4)


def test_v1_with_v2_weights_gives_the_same_result():
    torch.manual_seed(789)
    v2 = SelfAttention_v2(3, 2)
    v1 = SelfAttention_v1(3, 2)
    with torch.no_grad():  # nn.Linear stores W transposed
        v1.W_query.copy_(v2.W_query.weight.T)
        v1.W_key.copy_(v2.W_key.weight.T)
        v1.W_value.copy_(v2.W_value.weight.T)
    assert torch.allclose(v1(INPUTS), v2(INPUTS), atol=1e-6)


def test_causal_and_multi_head_course_figures():
    batch = torch.stack((INPUTS, INPUTS))  # (2, 6, 3)
    torch.manual_seed(123)
    ca = CausalAttention(3, 2, batch.shape[1], 0.0)
    first_head = torch.tensor([[-0.4519, 0.2216], [-0.5874, 0.0058], [-0.6300, -0.0632],
                               [-0.5675, -0.0843], [-0.5526, -0.0981], [-0.5299, -0.1081]])
    out = ca(batch)
    assert out.shape == (2, 6, 2) and torch.allclose(out[0], first_head, atol=1e-4)

    torch.manual_seed(123)
    wrapper = MultiHeadAttentionWrapper(3, 2, batch.shape[1], 0.0, num_heads=2)
    out = wrapper(batch)
    assert out.shape == (2, 6, 4)
    assert torch.allclose(out[0, :, :2], first_head, atol=1e-4)  # same seed -> same first head

    torch.manual_seed(123)
    mha = MultiHeadAttention(3, 2, batch.shape[1], 0.0, num_heads=2)
    expected = torch.tensor([[0.3190, 0.4858], [0.2943, 0.3897], [0.2856, 0.3593],
                             [0.2693, 0.3873], [0.2639, 0.3928], [0.2575, 0.4028]])
    out = mha(batch)
    assert out.shape == (2, 6, 2) and torch.allclose(out[1], expected, atol=1e-4)


def test_multi_head_attention_matches_pytorch_sdpa():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 16, context_length=10, dropout=0.0, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(3, 7, 16)
    q, k, v = (lin(x).view(3, 7, 4, 4).transpose(1, 2) for lin in (mha.W_query, mha.W_key, mha.W_value))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(3, 7, 16)
    assert torch.allclose(mha(x), mha.out_proj(ref), atol=1e-6)
    # Causality: changing a later token never changes earlier outputs.
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert torch.allclose(mha(x)[:, :-1], mha(x2)[:, :-1], atol=1e-6)


def test_dropout_only_in_training_mode():
    torch.manual_seed(1)
    mha = MultiHeadAttention(8, 8, 6, dropout=0.5, num_heads=2)
    x = torch.randn(1, 6, 8)
    mha.eval()
    assert torch.equal(mha(x), mha(x))
    mha.train()
    assert not torch.allclose(mha(x), mha.eval()(x))


def test_bad_shapes_are_explained():
    with pytest.raises(GptlabError, match="d_out=6 must be divisible by num_heads=4"):
        MultiHeadAttention(3, 6, 10, 0.0, num_heads=4)
    with pytest.raises(GptlabError, match="input has 7 tokens but the attention's context_length is 6"):
        CausalAttention(3, 2, 6, 0.0)(torch.rand(1, 7, 3))
    with pytest.raises(GptlabError, match="input has 7 tokens"):
        MultiHeadAttention(3, 2, 6, 0.0, num_heads=1)(torch.rand(1, 7, 3))
