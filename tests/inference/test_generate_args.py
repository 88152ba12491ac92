"""generate's Python API answers bad arguments with one GptlabError naming the argument (issue 16)."""

import logging

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.inference import generate, generate_events
from gptlab.models import build_model
from gptlab.models.gpt2 import GPT2Config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(GPT2Config(vocab_size=61, context_length=16, emb_dim=16, n_layers=1, n_heads=2)).eval()


@pytest.mark.parametrize("ids, match", [
    ([1, 2, 3], "ids must be a tensor of token ids.*got a list"),
    (torch.tensor([1.0, 2.0]), "ids must hold integer token ids, got dtype torch.float32"),
    (torch.tensor([1, 61]), "ids holds token id 61, outside the model's vocabulary 0..60"),
    (torch.tensor([-1, 2]), "ids holds token id -1"),
])
def test_bad_ids_are_named(model, ids, match):
    with pytest.raises(GptlabError, match=match):
        generate(model, ids, 3)
    with pytest.raises(GptlabError, match=match):
        next(generate_events(model, ids, 3))


@pytest.mark.parametrize("seed", ["x", 1.5, True])
def test_a_seed_that_is_not_an_integer_is_named(model, seed):
    with pytest.raises(GptlabError, match="seed=.* must be an integer"):
        generate(model, torch.tensor([1, 2]), 3, temperature=1.0, seed=seed)


def test_sliding_past_the_context_warns_once(model, caplog):
    with caplog.at_level(logging.WARNING, logger="gptlab.inference.generation"):
        out = generate(model, torch.tensor([1, 2, 3]), 40)
    assert out.shape == (1, 43)
    warnings = [r for r in caplog.records if "passes the model's context of 16 tokens" in r.getMessage()]
    assert len(warnings) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gptlab.inference.generation"):
        generate(model, torch.tensor([1, 2, 3]), 13)  # 3 + 13 = 16 tokens: the context holds them all
    assert not caplog.records
