"""Writing a tokenizer into a GGUF file (gguf_tokenizer_metadata): read back by gptlab and by llama.cpp
with the ids of the tokenizer it came from (SentencePiece: sentencepiece's own ids)."""

from pathlib import Path

import pytest
import torch
from gguf_helpers import open_llama_cpp
from test_gguf_sentencepiece import real_texts, spm_pair  # noqa: F401  (the module's fixture)

from gptlab.errors import GptlabError
from gptlab.models import build_model
from gptlab.models.llama import LlamaConfig
from gptlab.tokenizers import load_tokenizer
from gptlab.tokenizers.gguf_tokenizer import gguf_tokenizer_metadata, pre_tokenizer_name
from gptlab.weights.gguf import read_metadata
from gptlab.weights.gguf_export import export_gguf


@pytest.fixture(scope="module")
def spm_export(spm_pair, tmp_path_factory):  # noqa: F811
    """A tiny Llama with the SentencePiece tokenizer gptlab read from a GGUF, exported again."""
    sp, tok, _ = spm_pair
    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=tok.vocab_size, context_length=32, emb_dim=32, n_layers=1,
                                    n_heads=2, hidden_dim=64)).eval()
    out = tmp_path_factory.mktemp("spm-export") / "m.gguf"
    export_gguf(model, out, tok, "f32")
    return sp, out


def test_sentencepiece_export_reads_back_with_sentencepiece_ids(spm_export):
    sp, out = spm_export
    meta = read_metadata(out)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is True
    assert [meta["tokenizer.ggml.token_type"][i] for i in range(6)] == [2, 3, 3, 3, 3, 4]
    assert meta["tokenizer.ggml.token_type"][meta["tokenizer.ggml.tokens"].index("<0x41>")] == 6
    tok = load_tokenizer(str(out))
    for name, text in real_texts().items():
        assert tok.encode(text) == sp.encode(text), name
    assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_llama_cpp_tokenizes_the_sentencepiece_export_like_sentencepiece(spm_export):
    sp, out = spm_export
    llm = open_llama_cpp(out, n_ctx=32)
    for name, text in real_texts().items():
        if name == "empty":
            continue
        ids = llm.tokenize(text[:20_000].encode(), add_bos=False, special=False)
        assert ids == sp.encode(text[:20_000]), name


def test_a_pre_tokenizer_llama_cpp_does_not_know_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from gptlab.tokenizers.hf import HFTokenizer

    backend = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(GptlabError, match="none that llama.cpp knows"):
        pre_tokenizer_name(backend)
    with pytest.raises(GptlabError, match="only 1 embedding rows"):
        gguf_tokenizer_metadata(HFTokenizer(backend), 1)


def test_openai_gpt2_tokenizer_exports(gpt2_dir, tmp_path):
    """The course's GPT-2 tokenizer (tiktoken over encoder.json + vocab.bpe): gptlab and llama.cpp read
    the exported file back with tiktoken's ids."""
    from paths import SHARED

    from gptlab.models.gpt2 import GPT2Config
    from gptlab.tokenizers.gpt2 import GPT2Tokenizer

    tok = GPT2Tokenizer.from_dir(gpt2_dir)
    model = build_model(GPT2Config(vocab_size=50257, context_length=32, emb_dim=32, n_layers=1, n_heads=2)).eval()
    out = tmp_path / "gpt2.gguf"
    export_gguf(model, out, tok, "f16")
    meta = read_metadata(out)
    assert (meta["tokenizer.ggml.pre"], meta["tokenizer.ggml.eos_token_id"]) == ("gpt-2", 50256)
    text = (Path(SHARED) / "the-verdict.txt").read_text(encoding="utf-8") + " <|endoftext|> 3.14159 £ 😀"
    back = load_tokenizer(str(out))
    assert back.encode(text) == tok.encode(text)
    llm = open_llama_cpp(out, n_ctx=32)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text)
