"""Sampling and cached decoding, checked against transformers' logits processors."""

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.inference.generation import generate
from gptlab.inference.sampling import filter_logits
from gptlab.models import build_model
from gptlab.models.gpt2 import GPT2Config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(GPT2Config(vocab_size=61, context_length=24, emb_dim=32, n_layers=2, n_heads=2)).eval()


def test_cached_greedy_equals_recompute_even_past_the_context(model):
    x = torch.randint(0, 61, (2, 5))
    for n in (10, 40):  # 5 + 40 > context 24: the window slides
        assert torch.equal(generate(model, x, n, use_cache=True), generate(model, x, n, use_cache=False))


def test_cached_sampling_equals_recompute(model):
    x = torch.randint(0, 61, (1, 4))
    a = generate(model, x, 15, temperature=1.3, top_k=20, seed=7, use_cache=True)
    b = generate(model, x, 15, temperature=1.3, top_k=20, seed=7, use_cache=False)
    assert torch.equal(a, b)


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    x = torch.randint(0, 61, (1, 4))
    a = generate(model, x, 20, temperature=1.5, seed=1)
    assert torch.equal(a, generate(model, x, 20, temperature=1.5, seed=1))
    assert not torch.equal(a, generate(model, x, 20, temperature=1.5, seed=2))


def test_degenerate_filters_reduce_to_greedy(model):
    x = torch.randint(0, 61, (2, 4))
    greedy = generate(model, x, 12)
    assert torch.equal(greedy, generate(model, x, 12, temperature=1.0, top_k=1, seed=3))
    assert torch.equal(greedy, generate(model, x, 12, temperature=1.0, top_p=1e-6, seed=3))
    assert torch.equal(greedy, generate(model, x, 12, temperature=1.0, min_p=1.0, seed=3))


def test_prompt_longer_than_context_is_cropped(model):
    x = torch.randint(0, 61, (1, 40))
    out = generate(model, x, 3)
    assert out.shape == (1, 43)
    assert torch.equal(out[:, 40:], generate(model, x[:, -24:], 3)[:, 24:])


def test_eos_stops_and_pads(model):
    x = torch.randint(0, 61, (1, 4))
    free = generate(model, x, 10)[0, 4:].tolist()
    eos = free[2]
    out = generate(model, x, 10, eos_id=eos)[0, 4:].tolist()
    assert out == free[:free.index(eos) + 1]
    # min_new_tokens suppresses eos for the first steps
    out2 = generate(model, x, 10, eos_id=eos, min_new_tokens=5)[0, 4:].tolist()
    assert eos not in out2[:5]


def test_num_return_sequences(model):
    out = generate(model, torch.tensor([1, 2, 3]), 6, temperature=1.0, num_return_sequences=3, seed=0)
    assert out.shape == (3, 9)


@pytest.mark.parametrize("kw,msg", [
    (dict(temperature=-0.1), "temperature=-0.1 must be >= 0"),
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
    (dict(top_k=0), "top_k=0 must be >= 1"),
    (dict(min_p=2.0), "min_p=2.0"),
])
def test_invalid_sampling_values(model, kw, msg):
    with pytest.raises(GptlabError, match=msg):
        generate(model, torch.tensor([[1]]), 3, **kw)


def test_empty_prompt_is_an_error(model):
    with pytest.raises(GptlabError, match="prompt is empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)


def _kept(logits):
    return torch.isfinite(logits)


def test_filters_match_transformers_logits_processors():
    transformers = pytest.importorskip("transformers")
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 100) * 3
    ids = torch.zeros(4, 1, dtype=torch.long)
    for k in (1, 5, 50):
        ref = TopKLogitsWarper(k)(ids, logits.clone())
        assert torch.equal(_kept(ref), _kept(filter_logits(logits, top_k=k)))
    for p in (0.1, 0.5, 0.9, 0.99):
        ref = TopPLogitsWarper(p)(ids, logits.clone())
        assert torch.equal(_kept(ref), _kept(filter_logits(logits, top_p=p)))
    for p in (0.05, 0.3):
        ref = MinPLogitsWarper(p)(ids, logits.clone())
        assert torch.equal(_kept(ref), _kept(filter_logits(logits, min_p=p)))
