"""HFTokenizer against transformers on the same tokenizer.json; our byte-level BPE trainer."""

import json

import pytest

from gptlab.errors import GptlabError
from gptlab.tokenizers import EOT, HFTokenizer, load_tokenizer, train_bpe

TEXTS = [
    "Hello world!  Two  spaces,\ttab\nnewline",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "naïve 🙂 東京 <|endoftext|> end",
    " leading space and trailing ",
]
SPECIALS = [EOT, "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def trained(verdict_text):
    return train_bpe(verdict_text, vocab_size=600, special_tokens=SPECIALS)


@pytest.fixture(scope="module")
def hf_dir(trained, tmp_path_factory):
    """A Hugging Face style dir: tokenizer.json + tokenizer_config.json (no gptlab file)."""
    d = tmp_path_factory.mktemp("hf")
    (d / "tokenizer.json").write_text(trained.backend.to_str())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>",
        "pad_token": EOT, "chat_template": TEMPLATE}))
    return d


def test_trained_bpe_facts(trained):
    assert trained.kind == "hf" and trained.vocab_size == 600
    assert trained.special_tokens == {EOT: 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert trained.eos_token == EOT and trained.eos_id == 0


def test_trained_bpe_compresses_and_is_lossless(trained, verdict_text):
    ids = trained.encode(verdict_text)
    assert len(ids) < len(verdict_text.encode()) / 2  # 341 merges learned on this very text
    assert trained.decode(ids) == verdict_text
    unseen = "Ünïcödé ✓ \x00\x01 control bytes \r\n and 🙂"  # never in the training text
    assert trained.decode(trained.encode(unseen)) == unseen


def test_matches_transformers(hf_dir):
    from transformers import PreTrainedTokenizerFast

    ours = load_tokenizer(hf_dir)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids, clean_up_tokenization_spaces=False) == text


def test_tokenizer_config_is_read(hf_dir):
    tok = load_tokenizer(hf_dir / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.chat_template == TEMPLATE


def test_allowed_special(hf_dir):
    tok = load_tokenizer(hf_dir)
    text = "<|im_start|>hi<|endoftext|>"
    assert tok.encode(text)[0] == 1 and tok.encode(text)[-1] == 0
    none = tok.encode(text, allowed_special="none")
    assert not {0, 1, 2} & set(none) and tok.decode(none) == text
    some = tok.encode(text, allowed_special={EOT})
    assert some[-1] == 0 and 1 not in some and tok.decode(some) == text


def test_save_reload_keeps_everything(hf_dir, tmp_path):
    tok = load_tokenizer(hf_dir)
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert json.loads((tmp_path / "gptlab_tokenizer.json").read_text())["kind"] == "hf"
    assert (back.bos_id, back.eos_id, back.pad_id, back.chat_template) == (1, 2, 0, TEMPLATE)
    assert all(back.encode(t) == tok.encode(t) for t in TEXTS)


def test_list_form_chat_template(hf_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert load_tokenizer(tmp_path).chat_template == "D"


def test_bad_inputs(hf_dir, tmp_path, verdict_text):
    (tmp_path / "tokenizer.json").write_text("{ broken")
    with pytest.raises(GptlabError, match="not a valid Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(GptlabError, match="not in this tokenizer's vocabulary"):
        HFTokenizer(load_tokenizer(hf_dir).backend, eos_token="</s>")
    with pytest.raises(GptlabError, match="too small"):
        train_bpe(verdict_text, vocab_size=200)
    with pytest.raises(GptlabError, match="no text"):
        train_bpe(iter([]), vocab_size=300)
    with pytest.raises(GptlabError, match="duplicates"):
        train_bpe("abc", vocab_size=300, special_tokens=[EOT, EOT])


def test_train_from_iterator_equals_string(verdict_text):
    parts = verdict_text.split("\n")
    a = train_bpe(verdict_text, vocab_size=400)
    b = train_bpe((p + "\n" for p in parts), vocab_size=400)
    assert a.vocab_size == b.vocab_size == 400
    assert b.decode(b.encode(verdict_text)) == verdict_text
