"""GPT-2 BPE built from encoder.json + vocab.bpe must equal tiktoken's own "gpt2" encoding."""

import pytest

from gptlab.errors import GptlabError
from gptlab.tokenizers import GPT2Tokenizer, load_tokenizer
from gptlab.tokenizers.gpt2 import bytes_to_unicode, ranks_from_files

BOOK_TEXT = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
# The ids the course prints for BOOK_TEXT (chapter 2) and for "Akwirw ier".
BOOK_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617,
            34680, 27271, 13]

SAMPLES = [
    BOOK_TEXT,
    "Akwirw ier",
    "  leading and   inner   spaces\n\n\ttabs\r\nCRLF  ",
    "naïve café — 東京 🙂🙃 👩‍👩‍👧 \u200b zero-width",
    "it's we'll they've I'M don't 12345 3.14159 $$$ ... ",
    "<|endoftext|><|endoftext|>",
    "",
]


@pytest.fixture(scope="module")
def tok(gpt2_dir):
    return load_tokenizer(gpt2_dir)


@pytest.fixture(scope="module")
def reference(tiktoken_cache):
    import os

    import tiktoken
    import tiktoken.registry

    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tiktoken_cache)
    try:
        enc = tiktoken.get_encoding("gpt2")
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR")
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
    return enc


def test_book_ids(tok):
    assert tok.encode(BOOK_TEXT) == BOOK_IDS
    assert tok.encode("Akwirw ier") == [33901, 86, 343, 86, 220, 959]
    assert tok.decode(BOOK_IDS) == BOOK_TEXT
    assert tok.token_pieces([33901, 86, 343, 86, 220, 959]) == ["Ak", "w", "ir", "w", " ", "ier"]


def test_facts(tok):
    assert tok.kind == "gpt2" and tok.vocab_size == 50257
    assert tok.eos_id == 50256 and tok.special_tokens == {"<|endoftext|>": 50256}
    assert tok.bos_id is None and tok.pad_id is None
    assert len(bytes_to_unicode()) == 256 and bytes_to_unicode()[ord(" ")] == "Ġ"


@pytest.mark.parametrize("text", SAMPLES)
def test_matches_tiktoken(tok, reference, text):
    assert tok.encode(text) == reference.encode(text, allowed_special="all")
    assert tok.encode(text, allowed_special="none") == reference.encode(text, disallowed_special=())
    assert tok.decode(tok.encode(text)) == text


def test_matches_tiktoken_on_a_whole_story(tok, reference, verdict_text):
    ids = tok.encode(verdict_text)
    assert len(ids) == 5145  # the course's count for the-verdict.txt
    assert ids == reference.encode(verdict_text)


def test_matches_transformers(gpt2_dir, tok, tmp_path):
    """The same files read as HF vocab.json/merges.txt by transformers give the same ids."""
    import shutil

    from transformers import GPT2TokenizerFast

    shutil.copy(gpt2_dir / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(gpt2_dir / "vocab.bpe", tmp_path / "merges.txt")
    hf = GPT2TokenizerFast.from_pretrained(str(tmp_path))
    for text in SAMPLES:
        assert tok.encode(text) == hf(text)["input_ids"]


def test_specials_policy(tok):
    text = "a<|endoftext|>b"
    assert tok.encode(text) == tok.encode(text, allowed_special={"<|endoftext|>"})
    assert 50256 in tok.encode(text)
    none = tok.encode(text, allowed_special="none")
    assert 50256 not in none and tok.decode(none) == text
    with pytest.raises(GptlabError, match="not special tokens"):
        tok.encode(text, allowed_special={"<|im_start|>"})
    with pytest.raises(GptlabError, match="needs a str"):
        tok.encode(b"bytes")


def test_decode_rejects_foreign_ids(tok):
    with pytest.raises(GptlabError, match="outside"):
        tok.decode([50257])


def test_named_gpt2_uses_tiktoken_cache(offline_tiktoken, tok):
    named = load_tokenizer("gpt2")
    assert named.encode(BOOK_TEXT) == BOOK_IDS
    assert named.encode(SAMPLES[3]) == tok.encode(SAMPLES[3])


def test_named_gpt2_offline_error(tmp_path, monkeypatch):
    import tiktoken.load

    def offline(url):
        raise ConnectionError("no network")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    with pytest.raises(GptlabError, match="offline.*encoder.json and vocab.bpe"):
        load_tokenizer("gpt2")


def test_save_and_reload(tok, tmp_path):
    tok.save(tmp_path / "t")
    back = load_tokenizer(tmp_path / "t")
    assert isinstance(back, GPT2Tokenizer) and back.encode(BOOK_TEXT) == BOOK_IDS
    assert (tmp_path / "t" / "encoder.json").read_bytes() == (tok._files["encoder.json"])


def test_mismatched_files_are_rejected(gpt2_dir):
    enc = (gpt2_dir / "encoder.json").read_bytes()
    vocab = (gpt2_dir / "vocab.bpe").read_bytes()
    lines = vocab.split(b"\n")
    swapped = b"\n".join([lines[0], lines[2], lines[1], *lines[3:]])  # two merges out of order
    with pytest.raises(GptlabError, match="disagree"):
        ranks_from_files(enc, swapped)
    with pytest.raises(GptlabError, match="not GPT-2 tokenizer files"):
        ranks_from_files(b"{not json", vocab)
    with pytest.raises(GptlabError, match="no encoder.json or vocab.bpe"):
        GPT2Tokenizer.from_dir(gpt2_dir.parent)
