"""`gptlab tokenizer train` and `gptlab tokenizer encode`."""

from gptlab.cli import run
from gptlab.tokenizers import load_tokenizer


def test_train_then_encode(tmp_path, capsys, verdict_text):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(verdict_text)
    out = tmp_path / "tok"
    assert run(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "300", "--out", str(out)]) == 0
    assert "saved a 300-token byte-level BPE" in capsys.readouterr().out
    tok = load_tokenizer(out)
    assert tok.vocab_size == 300 and tok.eos_id == 0
    assert run(["tokenizer", "encode", "--tokenizer", str(out), "the cat<|endoftext|>"]) == 0
    printed = capsys.readouterr().out
    ids = tok.encode("the cat<|endoftext|>")
    assert str(ids) in printed and "'<|endoftext|>'" in printed


def test_encode_gpt2_dir(gpt2_dir, capsys):
    assert run(["tokenizer", "encode", "--tokenizer", str(gpt2_dir), "Akwirw ier"]) == 0
    printed = capsys.readouterr().out
    assert "[33901, 86, 343, 86, 220, 959]" in printed and "['Ak', 'w', 'ir', 'w', ' ', 'ier']" in printed


def test_small_corpus_gives_a_smaller_vocab(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 50)
    assert run(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "t")]) == 0
    vocab = load_tokenizer(tmp_path / "t").vocab_size
    out = capsys.readouterr().out
    assert 257 < vocab < 300 and f"saved a {vocab}-token" in out
    # the shortfall is explained, not silent
    assert f"the corpus filled {vocab} of the 300 requested tokens" in out and "2+ times" in out


def test_a_full_vocabulary_gets_no_note(tmp_path, capsys, verdict_text):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(verdict_text)
    assert run(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "t")]) == 0
    assert "requested tokens" not in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert run(["tokenizer", "train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t")]) == 1
    assert "not found" in capsys.readouterr().err
    assert run(["tokenizer", "train", "--data", "builtin"]) == 1
    assert "give --out DIR" in capsys.readouterr().err
    assert run(["tokenizer", "encode", "--tokenizer", str(tmp_path), "hi"]) == 1
    assert "cannot load tokenizer" in capsys.readouterr().err
