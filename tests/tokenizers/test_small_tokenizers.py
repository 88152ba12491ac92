"""Character-level and the course's teaching tokenizers (word-level regex, SimpleBPE)."""

from paths import SHARED  # noqa: E402
from collections import Counter

import pytest

from gptlab.errors import GptlabError
from gptlab.tokenizers import EOT, CharTokenizer, RegexWordTokenizer, SimpleBPE, load_tokenizer
from gptlab.tokenizers.teaching import BPE_SPLIT, UNK


# ---- character level ---------------------------------------------------------------------------

def test_char_vocab_on_tinyshakespeare():
    from pathlib import Path

    path = Path(SHARED + "/tinyshakespeare.txt")
    if not path.is_file():
        pytest.skip("tinyshakespeare.txt not available")
    text = path.read_text()
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 65 + 1  # 65 distinct characters (nanoGPT's figure) + <|endoftext|>
    assert tok.encode("\n !") == [0, 1, 2]  # sorted: newline, space, "!"
    assert tok.eos_id == 65 and tok.decode([65]) == EOT
    assert tok.decode(tok.encode(text[:5000])) == text[:5000]


def test_char_errors_and_save(tmp_path):
    tok = CharTokenizer.from_text("hello world")
    with pytest.raises(GptlabError, match=r"character 'z' \(at offset 2\)"):
        tok.encode("hez")
    with pytest.raises(GptlabError, match="empty"):
        CharTokenizer.from_text("")
    with pytest.raises(GptlabError, match="outside"):
        tok.decode([99])
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, CharTokenizer) and back.chars == tok.chars
    assert back.encode("hello<|endoftext|>") == tok.encode("hello") + [tok.eos_id]


# ---- chapter 2's word-level tokenizer ----------------------------------------------------------

def test_word_tokenizer_matches_the_course(verdict_text):
    tok = RegexWordTokenizer.from_text(verdict_text)
    assert tok.vocab_size == 1130 + 2  # the course: 1130 distinct words, then <|endoftext|>, <|unk|>
    assert tok.special_tokens == {EOT: 1130, UNK: 1131}
    text = '"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    ids = tok.encode(text)
    assert ids == [1, 56, 2, 850, 988, 602, 533, 746, 5, 1126, 596, 5, 1, 67, 7, 38, 851, 1108, 754, 793, 7]
    assert tok.decode(ids) == '" It\' s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    mixed = tok.encode("Hello, do you like tea? <|endoftext|> In the sunlit terraces of the palace.")
    assert tok.decode(mixed) == ("<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the "
                                 "<|unk|>.")


def test_word_tokenizer_save(tmp_path, verdict_text):
    tok = RegexWordTokenizer.from_text(verdict_text[:2000])
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode(verdict_text[:300]) == tok.encode(verdict_text[:300])


# ---- SimpleBPE -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def simple(verdict_text):
    return SimpleBPE.train(verdict_text, vocab_size=300)


def test_simple_bpe_first_merge_is_most_frequent_pair(simple, verdict_text):
    pairs = Counter()
    for chunk in BPE_SPLIT.findall(verdict_text):
        b = chunk.encode()
        pairs.update(zip(b, b[1:]))
    top = max(pairs.values())
    assert simple.merges[0] in {p for p, c in pairs.items() if c == top}
    assert simple.vocab_size == 300 and simple.eos_id == 299
    assert len(simple.merges) == 300 - 256 - 1


def test_simple_bpe_roundtrip_and_compression(simple, verdict_text):
    ids = simple.encode(verdict_text)
    assert simple.decode(ids) == verdict_text
    assert len(ids) < 0.75 * len(verdict_text.encode())
    assert simple.encode("the<|endoftext|>") == simple.encode("the") + [299]


def test_simple_bpe_split_is_lossless():
    text = "Hi _under_score ½ 3.5 it's  \t x\u0301 — 東京 🙂\n\n"
    assert "".join(BPE_SPLIT.findall(text)) == text


def test_simple_bpe_save_and_errors(simple, tmp_path):
    simple.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert back.merges == simple.merges and back.encode("painted") == simple.encode("painted")
    with pytest.raises(GptlabError, match="too small"):
        SimpleBPE.train("abc", vocab_size=100)
    with pytest.raises(GptlabError, match="does not exist yet"):
        SimpleBPE([(300, 1)])


def test_simple_bpe_stops_when_no_pair_repeats():
    tok = SimpleBPE.train("abcd", vocab_size=1000)  # every pair occurs once
    assert tok.merges == [] and tok.vocab_size == 257
