"""The course's GPTModel and gptlab's GPT2 are one network: weights move both ways."""

from __future__ import annotations

import pytest
import torch

from gptlab.book import GPTModel, book_to_gptlab, gptlab_to_book
from gptlab.book.convert import book_state_to_gptlab
from gptlab.errors import GptlabError
from gptlab.models.gpt2 import GPT2Config
from gptlab.models.gpt2 import GPT2


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_book_to_gptlab_and_back_same_logits(tiny_cfg, qkv_bias):
    torch.manual_seed(123)
    book = GPTModel(dict(tiny_cfg, qkv_bias=qkv_bias)).eval()
    ids = torch.randint(0, tiny_cfg["vocab_size"], (2, 20))
    gpt2 = book_to_gptlab(book).eval()
    assert isinstance(gpt2, GPT2) and gpt2.cfg.tie_embeddings is False and gpt2.cfg.qkv_bias is qkv_bias
    assert gpt2.cfg.drop_rate == tiny_cfg["drop_rate"]
    with torch.no_grad():
        ref = book(ids)
        assert torch.allclose(gpt2(ids), ref, atol=1e-5)
        back = gptlab_to_book(gpt2).eval()
        assert torch.equal(back(ids), ref)  # the round trip is exact
    # q, k, v are stacked row-wise in that order.
    w = gpt2.blocks[1].attn.qkv.weight
    d = tiny_cfg["emb_dim"]
    att = book.trf_blocks[1].att
    assert torch.equal(w[:d], att.W_query.weight) and torch.equal(w[d:2 * d], att.W_key.weight)
    assert torch.equal(w[2 * d:], att.W_value.weight)


def test_gptlab_to_book_from_a_fresh_gptlab_model():
    torch.manual_seed(0)
    gpt2 = GPT2(GPT2Config(vocab_size=100, context_length=16, emb_dim=24, n_layers=2, n_heads=3,
                           tie_embeddings=True)).eval()
    book = gptlab_to_book(gpt2).eval()
    ids = torch.randint(0, 100, (3, 16))
    with torch.no_grad():
        assert torch.allclose(book(ids), gpt2(ids), atol=1e-5)
    assert book.trf_blocks[0].att.mask.shape == (16, 16)
    assert torch.equal(book.out_head.weight, gpt2.tok_emb.weight)  # the tied head is copied


def test_conversion_errors_are_explained(tiny_cfg):
    book = GPTModel(tiny_cfg)
    book.out_head = torch.nn.Linear(tiny_cfg["emb_dim"], 2)
    with pytest.raises(GptlabError, match="classifier head"):
        book_to_gptlab(book)
    with pytest.raises(GptlabError, match="needs a gptlab.book.GPTModel"):
        book_to_gptlab(torch.nn.Linear(2, 2))
    with pytest.raises(GptlabError, match="needs a gptlab GPT-2 model"):
        gptlab_to_book(GPTModel(tiny_cfg))
    odd = GPT2(GPT2Config(vocab_size=10, context_length=8, emb_dim=8, n_heads=2, n_layers=1, hidden_dim=20))
    with pytest.raises(GptlabError, match="4x MLP"):
        gptlab_to_book(odd)
    state = GPTModel(tiny_cfg).state_dict()
    state["trf_blocks.0.att.W_query.lora_A"] = torch.zeros(1)
    with pytest.raises(GptlabError, match="no place for.*lora_A"):
        book_state_to_gptlab(state, tiny_cfg["n_layers"], False)
    del state["trf_blocks.0.att.W_query.lora_A"], state["final_norm.scale"]
    with pytest.raises(GptlabError, match="lacks 'final_norm.scale'"):
        book_state_to_gptlab(state, tiny_cfg["n_layers"], False)


def test_a_course_model_runs_in_the_full_toolkit(tiny_cfg, tmp_path, data_dir):
    """docs/course.md's path: book model -> gptlab GPT2 -> model dir -> gptlab.load_model / load_tokenizer."""
    from gptlab.tokenizers import load_tokenizer
    from gptlab.weights import load_model
    from gptlab.weights.native import save_model_dir

    torch.manual_seed(123)
    book = GPTModel(tiny_cfg).eval()
    tok = load_tokenizer(str(data_dir / "gpt2"))
    save_model_dir(book_to_gptlab(book), tmp_path / "my-model", tokenizer=tok)
    loaded = load_model(tmp_path / "my-model").eval()
    ids = torch.tensor([tok.encode("Every effort moves you")])
    with torch.no_grad():
        assert torch.allclose(loaded(ids), book(ids), atol=1e-5)
    assert load_tokenizer(str(tmp_path / "my-model")).encode("Every effort moves you") == [6109, 3626, 6100, 345]
