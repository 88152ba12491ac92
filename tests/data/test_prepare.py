"""gptlab prepare: streamed tokenization equals whole-text tokenization, in bounded memory."""

import json
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptlab.cli import run
from gptlab.data import TokenFile, boundary_chunks, load_corpus, load_prepared, prepare_corpus, token_dtype
from gptlab.errors import GptlabError
from gptlab.tokenizers import CharTokenizer, load_tokenizer, train_bpe

TRICKY = st.lists(st.sampled_from(["word", " ", "  ", "\n", "\n\n", "\t", "\r\n", " \n", "\u00a0", "\u3000",
                                   "\x1c", "\x85", "'s", "...", "🙂", "é", "12", "<|endoftext|>"]),
                  max_size=60).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=TRICKY, size=st.integers(1, 40))
def test_chunk_cuts_never_change_gpt2_tokens(gpt2_tok, text, size):
    chunks = list(boundary_chunks(iter([text[i:i + 7] for i in range(0, len(text), 7)]), size, gpt2_tok.special_tokens,
                                  max_factor=10_000))
    assert "".join(chunks) == text
    assert [t for c in chunks for t in gpt2_tok.encode(c)] == gpt2_tok.encode(text)


def test_chunk_sizes_and_the_no_boundary_fallback():
    text = "alpha beta gamma delta " * 100
    chunks = list(boundary_chunks([text], 50))
    assert "".join(chunks) == text and all(len(c) <= 51 for c in chunks)
    assert all(c.endswith(("a", "a ")) or c == chunks[-1] for c in chunks)  # cut before " word"
    glued = "x" * 1000  # no whitespace at all: held up to max_factor * chunk_chars, then cut
    assert [len(c) for c in boundary_chunks([glued], 50, max_factor=8)] == [400, 400, 200]
    assert list(boundary_chunks(["ab", "cd ef"], 3, max_factor=100)) == ["abcd", " ef"]


@pytest.fixture(scope="module")
def small_bpe(shared_data):
    return train_bpe((shared_data / "the-verdict.txt").read_text(), vocab_size=400)


# Llama 3's split regex (a fact from its tokenizer.json): unlike GPT-2's it glues
# newlines to punctuation (".\n\n") and to preceding whitespace, so a cut inside a
# whitespace run would change the ids; cuts are made only at "word| word".
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def llama3_style_bpe(shared_data):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from gptlab.tokenizers import HFTokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = (shared_data / "tinyshakespeare.txt").read_text()[:100_000]
    backend.train_from_iterator([text], trainer=trainer)
    return HFTokenizer(backend), text


@settings(max_examples=80, deadline=None)
@given(text=TRICKY, size=st.integers(1, 40))
def test_chunk_cuts_never_change_trained_bpe_tokens(small_bpe, llama3_style_bpe, text, size):
    for tok in (small_bpe, llama3_style_bpe[0]):
        chunks = list(boundary_chunks([text], size, tok.special_tokens, max_factor=10_000))
        assert [t for c in chunks for t in tok.encode(c)] == tok.encode(text)


def test_chunked_llama3_style_ids_equal_whole_text(llama3_style_bpe):
    tok, text = llama3_style_bpe  # Shakespeare: ".\n\n" after every speech
    whole = tok.encode(text)
    for size in (200, 3000):
        assert [t for c in boundary_chunks([text], size, tok.special_tokens) for t in tok.encode(c)] == whole


def test_prepare_builtin_equals_whole_encoding(tmp_path, gpt2_tok):
    meta = prepare_corpus(None, tmp_path / "p", tokenizer=gpt2_tok, chunk_chars=20_000, progress=False)
    full = gpt2_tok.encode(load_corpus())
    assert meta["train_tokens"] + meta["val_tokens"] == len(full)
    assert meta["val_tokens"] == round(0.1 * len(full)) and meta["dtype"] == "uint16"
    data = load_prepared(tmp_path / "p")
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    assert np.array_equal(np.concatenate([data.train, data.val]), np.array(full))
    assert data.tokenizer().encode("Hello") == gpt2_tok.encode("Hello")
    assert (meta["tokenizer_kind"], meta["vocab_size"], meta["eos_id"]) == ("gpt2", 50257, 50256)


def test_prepare_trains_a_tokenizer_when_none_given(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "1.txt").write_text("The quick brown fox jumps over the lazy dog. " * 300)
    (docs / "2.txt").write_text("Pack my box with five dozen liquor jugs!\r\n" * 300)
    meta = prepare_corpus(docs, tmp_path / "out", vocab_size=300, chunk_chars=1000, progress=False)
    data = load_prepared(tmp_path / "out")
    tok = data.tokenizer()
    assert meta["tokenizer_kind"] == "hf" and tok.vocab_size <= 300
    # Lossless end to end: the token files decode back to the exact corpus.
    assert tok.decode(np.concatenate([data.train, data.val]).tolist()) == load_corpus(docs)


def test_char_vocabulary_built_from_the_corpus(tmp_path, shared_data):
    meta = prepare_corpus(shared_data / "tinyshakespeare.txt", tmp_path, tokenizer="char", progress=False)
    assert meta["tokenizer_kind"] == "char" and meta["vocab_size"] == 65 + 1  # nanoGPT's 65 characters
    assert meta["train_tokens"] + meta["val_tokens"] == 1_115_394  # one token per character
    data = load_prepared(tmp_path)
    assert data.tokenizer().decode(data.val[-20:].tolist()) == (shared_data / "tinyshakespeare.txt").read_text()[-20:]


def test_uint32_when_ids_exceed_16_bits(tmp_path):
    chars = [chr(c) for c in range(0x100, 0x100 + 70_000 + 2048) if not 0xD800 <= c < 0xE000][:70_000]
    tok = CharTokenizer(chars)
    assert token_dtype(tok.vocab_size) == np.uint32 and token_dtype(65_536) == np.uint16
    text = "".join(chars[-50:]) + " " + "".join(chars[:50])
    (tmp_path / "c.txt").write_text(text + " " + chars[0])
    with pytest.raises(GptlabError, match="character ' '"):  # space is not in this alphabet
        prepare_corpus(tmp_path / "c.txt", tmp_path / "bad", tokenizer=tok, progress=False)
    (tmp_path / "c.txt").write_text("".join(chars[-50:]) + "".join(chars[:50]))
    tok.save(tmp_path / "tok")
    meta = prepare_corpus(tmp_path / "c.txt", tmp_path / "out", tokenizer=str(tmp_path / "tok"), val_ratio=0.2,
                          progress=False)
    data = load_prepared(tmp_path / "out")
    assert meta["dtype"] == "uint32" and data.train.dtype == np.uint32
    assert np.concatenate([data.train, data.val]).tolist() == list(range(69_950, 70_000)) + list(range(50))


def test_no_validation_split(tmp_path, gpt2_tok, shared_data):
    prepare_corpus(shared_data / "the-verdict.txt", tmp_path, tokenizer=gpt2_tok, val_ratio=0.0, progress=False)
    data = load_prepared(tmp_path)
    assert len(data.train) == 5145 and len(data.val) == 0


def test_token_file_errors(tmp_path, gpt2_tok, shared_data):
    with pytest.raises(GptlabError, match="not a prepared corpus"):
        load_prepared(tmp_path)
    with pytest.raises(GptlabError, match="run `gptlab prepare"):
        TokenFile(tmp_path / "train.bin")
    prepare_corpus(shared_data / "the-verdict.txt", tmp_path, tokenizer=gpt2_tok, progress=False)
    assert len(TokenFile(tmp_path / "val.bin")) == round(5145 * 0.1)
    with open(tmp_path / "val.bin", "ab") as f:
        f.write(b"\x00")  # half a uint16
    with pytest.raises(GptlabError, match="not a whole number of uint16 ids"):
        load_prepared(tmp_path)
    with open(tmp_path / "val.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(GptlabError, match="holds 515 tokens but meta.json says 514"):
        load_prepared(tmp_path)
    with pytest.raises(GptlabError, match="val_ratio"):
        prepare_corpus(shared_data / "the-verdict.txt", tmp_path, tokenizer=gpt2_tok, val_ratio=1.0)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(GptlabError, match="empty"):
        prepare_corpus(tmp_path / "empty.txt", tmp_path / "e", tokenizer=gpt2_tok, progress=False)


def test_cli(tmp_path, capsys, shared_data, gpt2_tok):
    out = tmp_path / "p"
    code = run(["prepare", "--data", str(shared_data / "the-verdict.txt"), "--tokenizer",
                str(shared_data / "gpt2"), "--out", str(out), "--val-ratio", "0.2", "--progress", "false"])
    assert code == 0 and "4,116 train + 1,029 val tokens (uint16, gpt2" in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["val_tokens"] == 1029
    assert load_tokenizer(out).encode("Gisburn") == gpt2_tok.encode("Gisburn")
    assert run(["prepare", "--data", str(tmp_path / "missing.txt"), "--out", str(out)]) == 1
    assert "not found" in capsys.readouterr().err
    assert run(["prepare", "--data", "builtin"]) == 1
    assert "give --out DIR" in capsys.readouterr().err


def _peak_bytes(tmp_path, tok, n_bytes: int, chunk_chars: int) -> tuple[int, int]:
    """Write a ~n_bytes corpus, prepare it, return (peak traced bytes, tokens)."""
    unit = (
        "It was a bright cold day in April, and the clocks were striking thirteen. \n"
        "Ünïcödé ✓ 東京 🙂 — numbers 3.14159 and 2,718; symbols {}[]<>!?\n\n"
    )
    path = tmp_path / f"corpus_{n_bytes}.txt"
    with open(path, "w", encoding="utf-8") as f:
        block = unit * 1000
        for _ in range(max(1, n_bytes // len(block.encode()))):
            f.write(block)
    tracemalloc.start()
    try:
        meta = prepare_corpus(path, tmp_path / f"out_{n_bytes}", tokenizer=tok, chunk_chars=chunk_chars,
                              progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    path.unlink()
    return peak, meta["train_tokens"] + meta["val_tokens"]


def test_memory_does_not_grow_with_corpus_size(tmp_path, gpt2_tok):
    small_peak, small_tokens = _peak_bytes(tmp_path, gpt2_tok, 1_000_000, chunk_chars=64_000)
    big_peak, big_tokens = _peak_bytes(tmp_path, gpt2_tok, 4_000_000, chunk_chars=64_000)
    assert big_tokens > 3.5 * small_tokens
    assert big_peak < 1.5 * small_peak + 100_000  # 4x the data, about the same peak
    assert big_peak < 2_000_000  # far below the 4 MB corpus


@pytest.mark.slow
def test_bounded_memory_on_50mb(tmp_path, gpt2_tok):
    """50 MB through 1 MB chunks. The peak (a few copies of one chunk; this text holds an
    emoji, so Python stores it at 4 bytes a character) must not depend on the corpus size."""
    small_peak, _ = _peak_bytes(tmp_path, gpt2_tok, 10_000_000, chunk_chars=1_000_000)
    peak, tokens = _peak_bytes(tmp_path, gpt2_tok, 50_000_000, chunk_chars=1_000_000)
    assert tokens > 15_000_000
    assert peak < 1.3 * small_peak, f"peak grew from {small_peak / 1e6:.1f} MB (10 MB) to {peak / 1e6:.1f} MB (50 MB)"
    assert peak < 30_000_000, f"peak traced allocation {peak / 1e6:.1f} MB for a 50 MB corpus"
