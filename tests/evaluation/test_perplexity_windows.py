"""Strided perplexity: every token scored exactly once, with the context the window gives it."""

import math

import pytest
import torch
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.evaluation.perplexity import perplexity, token_losses
from gptlab.models import build_model
from gptlab.models.gpt2 import GPT2Config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(GPT2Config(vocab_size=50, context_length=16, emb_dim=32, n_layers=1, n_heads=2)).eval()


def _direct(model, ids):
    x = torch.tensor([ids[:-1]])
    return F.cross_entropy(model(x)[0], torch.tensor(ids[1:]), reduction="none")


def test_short_text_equals_one_forward_pass(model):
    ids = torch.randint(0, 50, (12,)).tolist()
    assert torch.allclose(token_losses(model, ids), _direct(model, ids), atol=1e-6)


@pytest.mark.parametrize("stride", [16, 8, 3])
def test_each_token_scored_once_with_its_window(model, stride):
    ids = torch.randint(0, 50, (70,)).tolist()
    got = token_losses(model, ids, max_length=16, stride=stride, batch_size=3)
    assert got.numel() == len(ids) - 1
    # Brute force: target j is predicted by the window that first reaches it.
    expected, prev_end, s = [], 1, 0
    while prev_end < len(ids):
        end = min(s + 17, len(ids))
        start = max(0, end - 17)
        losses = _direct(model, ids[start:end])
        expected.append(losses[prev_end - start - 1:])
        prev_end, s = end, s + stride
    assert torch.allclose(got, torch.cat(expected), atol=1e-5)


def test_perplexity_is_exp_loss(model):
    ids = torch.randint(0, 50, (40,)).tolist()
    r = perplexity(model, ids)
    assert r["tokens"] == 39 and math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-9)


def test_bad_inputs(model):
    with pytest.raises(GptlabError, match="needs at least 2"):
        token_losses(model, [3])
    with pytest.raises(GptlabError, match="stride=20 must not exceed"):
        token_losses(model, [1, 2, 3], max_length=16, stride=20)
