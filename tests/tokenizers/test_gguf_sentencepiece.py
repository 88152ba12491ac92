"""SentencePiece GGUF tokenizers (tokenizer.ggml.model = "llama"): ids equal to sentencepiece's own.

A small SentencePiece BPE model (byte fallback, identity normalizer, no
whitespace cleanup: the Llama 2 / Mistral settings) is trained once per module;
its pieces, scores and types are written into a GGUF file the way llama.cpp's
converter does, and gptlab's tokenizer read from that file must give the
``SentencePieceProcessor.encode`` ids on real text.
"""

from gguf_helpers import smollm2_gguf, write_gguf  # noqa: E402
from paths import SHARED  # noqa: E402
from pathlib import Path

import pytest

from gptlab.errors import GptlabError
from gptlab.tokenizers import load_tokenizer
from gptlab.tokenizers.chat_template import ChatTemplate
from gptlab.tokenizers.gguf_tokenizer import build_tokenizer
from gptlab.weights.gguf import read_metadata

spm = pytest.importorskip("sentencepiece")

DATA = Path(SHARED)
CONTROL = ["[INST]", "[/INST]"]  # control tokens, as in Mistral's vocabulary
USER = ["<tool>"]  # a user-defined token
BOS, EOS, INST, END_INST, TOOL = 1, 2, 3, 4, 5  # their ids in the trained model
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
            "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}"
            "{% endif %}{% endfor %}")  # Llama 2 / Mistral style


def _text(name: str) -> str:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path.read_text(encoding="utf-8")


def _train(directory: Path, name: str, add_dummy_prefix: bool = True):
    corpus = _text("the-verdict.txt") + "\n" + _text("tinyshakespeare.txt")[:300_000]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.splitlines()), model_prefix=str(directory / name), model_type="bpe",
        vocab_size=1500, byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=add_dummy_prefix, split_digits=True,
        control_symbols=CONTROL, user_defined_symbols=USER, num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(directory / f"{name}.model"))
    assert [sp.id_to_piece(i) for i in range(6)] == ["<unk>", "<s>", "</s>", *CONTROL, *USER]
    return sp


def _token_type(sp, i: int) -> int:
    """llama.cpp's token type for piece ``i`` (as its convert_hf_to_gguf.py assigns them)."""
    if sp.is_unknown(i):
        return 2
    if sp.is_control(i):
        return 3
    if sp.is_byte(i):
        return 6
    if sp.is_unused(i):
        return 5
    return 4 if sp.id_to_piece(i) in USER else 1


def write_spm_gguf(path: Path, sp, **overrides) -> Path:
    """A GGUF file holding ``sp``'s vocabulary as llama.cpp writes it; ``overrides`` replace or
    (with value None) drop ``tokenizer.*`` keys."""
    n = sp.get_piece_size()
    kv = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
          "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in range(n)],
          "tokenizer.ggml.token_type": [_token_type(sp, i) for i in range(n)],
          "tokenizer.ggml.bos_token_id": BOS, "tokenizer.ggml.eos_token_id": EOS,
          "tokenizer.ggml.unknown_token_id": 0, "tokenizer.chat_template": TEMPLATE}
    kv.update(overrides)
    return write_gguf(path, "llama", kv, {})


@pytest.fixture(scope="module")
def spm_pair(tmp_path_factory):
    """(sentencepiece model, gptlab tokenizer from the GGUF, GGUF path)."""
    d = tmp_path_factory.mktemp("spm")
    sp = _train(d, "spm")
    path = write_spm_gguf(d / "spm.gguf", sp)
    return sp, load_tokenizer(str(path)), path


def real_texts() -> dict[str, str]:
    sms = _text("SMSSpamCollection.tsv")
    return {"verdict": _text("the-verdict.txt"),
            "shakespeare": _text("tinyshakespeare.txt")[300_000:700_000],  # beyond the training part
            "sms file": sms,  # tabs, newlines, emoji, £ ... as one string
            "unicode": ("Ünïcödé — “quotes” café naïve 東京 😀👍🏽 emoji 2024-11-22 3.14159 "
                        "\t\ttabs\n\n\n  trailing   spaces   \r\n don't I'LL we've"),
            "spaces": "   three leading, two trailing  ", "one": "a", "empty": ""}


def sms_messages() -> list[str]:
    lines = _text("SMSSpamCollection.tsv").splitlines()
    messages = [line.split("\t", 1)[1] for line in lines]
    assert len(messages) == 5574
    return messages


def test_ids_equal_sentencepiece_on_real_text(spm_pair):
    sp, tok, _ = spm_pair
    compared = 0
    for name, text in real_texts().items():
        ids = tok.encode(text)
        assert ids == sp.encode(text), name
        assert tok.decode(ids) == text == sp.decode(ids), name
        compared += len(ids)
    for i, msg in enumerate(sms_messages()):
        ids = tok.encode(msg)
        assert ids == sp.encode(msg), f"SMS {i}: {msg!r}"
        assert tok.decode(ids) == msg, f"SMS {i}: {msg!r}"
        compared += len(ids)
    assert compared > 400_000
    # byte fallback really happened: £ (0xC2 0xA3) is not a piece of this vocabulary
    assert [sp.id_to_piece(i) for i in tok.encode("£")] == ["▁", "<0xC2>", "<0xA3>"]


def test_control_tokens_are_matched_whole_like_llama_cpp(spm_pair):
    """SentencePiece itself never reads control tokens from text; llama.cpp (parse_special) does,
    and encodes the text after one on its own, with its own space prefix."""
    sp, tok, _ = spm_pair
    assert tok.encode("<s>Hello") == [BOS] + sp.encode("Hello")
    assert tok.encode("[INST] Hi there [/INST]") == [INST] + sp.encode(" Hi there ") + [END_INST]
    assert tok.encode("Hi</s>") == sp.encode("Hi") + [EOS]
    # not allowed: the spelling is plain text, exactly as sentencepiece encodes it
    assert tok.encode("<s>[INST] Hi", allowed_special="none") == sp.encode("<s>[INST] Hi")
    assert tok.encode("<s>[INST] Hi", allowed_special={"[INST]"}) == (
        sp.encode("<s>") + [INST] + sp.encode(" Hi"))
    assert tok.decode([BOS, INST] + sp.encode(" Hi") + [END_INST]) == "<s>[INST]  Hi[/INST]"
    assert {"<s>", "</s>", "<unk>", "[INST]", "[/INST]"} <= set(tok.special_tokens)


def test_user_defined_tokens_follow_llama_cpp(spm_pair):
    """User-defined tokens are matched whole even when specials are not allowed. After one,
    llama.cpp prepends a space to the following text; sentencepiece does not (a documented
    difference that needs a user-defined token *and* add_space_prefix)."""
    sp, tok, _ = spm_pair
    text = "call <tool>now"
    assert tok.encode(text, allowed_special="none") == sp.encode("call ") + [TOOL] + sp.encode("now")
    theirs, ours = sp.encode(text, out_type=str), [sp.id_to_piece(i) for i in tok.encode(text)]
    assert "".join(theirs[theirs.index("<tool>") + 1:]) == "now"
    assert "".join(ours[ours.index("<tool>") + 1:]) == "▁now"


def test_without_space_prefix_equals_sentencepiece_without_dummy_prefix(tmp_path):
    """tokenizer.ggml.add_space_prefix = false (Gemma): no "▁" is prepended, decoding strips none."""
    sp = _train(tmp_path, "noprefix", add_dummy_prefix=False)
    tok = load_tokenizer(str(write_spm_gguf(tmp_path / "noprefix.gguf", sp,
                                            **{"tokenizer.ggml.add_space_prefix": False})))
    texts = [*real_texts().values(), *sms_messages()[:500], "a<tool>b c", " <tool> x"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == sp.encode(text), text[:80]
        assert tok.decode(ids) == text
    assert sp.id_to_piece(tok.encode("Hello")[0]) == "H"


def test_bos_eos_flags(tmp_path, spm_pair):
    """llama.cpp adds BOS to a SentencePiece prompt unless tokenizer.ggml.add_bos_token says no;
    the backend's encode() follows the flags, gptlab's Tokenizer.encode never adds either."""
    sp, tok, _ = spm_pair
    text = "I had always thought Jack Gisburn"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (BOS, EOS, None)
    assert tok.encode(text) == sp.encode(text)
    assert tok.backend.encode(text).ids == [BOS] + sp.encode(text)  # no add_bos_token key: default on
    for flags, want in (({"tokenizer.ggml.add_bos_token": False}, sp.encode(text)),
                        ({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True},
                         [BOS] + sp.encode(text) + [EOS]),
                        ({"tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": True},
                         sp.encode(text) + [EOS])):
        path = write_spm_gguf(tmp_path / "flags.gguf", sp, **flags)
        built = build_tokenizer(read_metadata(path), str(path))
        assert built.encode(text).ids == want, flags
        assert built.encode(text, add_special_tokens=False).ids == sp.encode(text)
        assert load_tokenizer(str(path)).encode(text) == sp.encode(text)
    path = write_spm_gguf(tmp_path / "nobos.gguf", sp, **{"tokenizer.ggml.bos_token_id": None,
                                                          "tokenizer.ggml.add_bos_token": True})
    with pytest.raises(GptlabError, match="add_bos_token is set but"):
        build_tokenizer(read_metadata(path), str(path))


def test_chat_template_renders_and_encodes(spm_pair):
    sp, tok, _ = spm_pair
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    prompt = ChatTemplate.for_tokenizer(tok).render(messages)
    assert prompt == "<s>[INST] Hi [/INST] Hello!</s>[INST] Bye [/INST]"
    assert tok.encode(prompt) == ([BOS, INST] + sp.encode(" Hi ") + [END_INST] + sp.encode(" Hello!") + [EOS]
                                  + [INST] + sp.encode(" Bye ") + [END_INST])


def test_bad_sentencepiece_metadata(tmp_path, spm_pair):
    sp = spm_pair[0]
    path = write_spm_gguf(tmp_path / "bert.gguf", sp, **{"tokenizer.ggml.model": "bert"})
    with pytest.raises(GptlabError) as e:
        load_tokenizer(str(path))
    msg = str(e.value)
    assert "'bert' tokenizer" in msg and "'gpt2' and 'llama'" in msg and "\n" not in msg
    path = write_spm_gguf(tmp_path / "noscores.gguf", sp, **{"tokenizer.ggml.scores": None})
    with pytest.raises(GptlabError, match="needs one score per token"):
        load_tokenizer(str(path))
    path = write_spm_gguf(tmp_path / "shortscores.gguf", sp, **{"tokenizer.ggml.scores": [0.0] * 10})
    with pytest.raises(GptlabError, match="10 scores for 1500 tokens"):
        load_tokenizer(str(path))


def test_transformers_on_the_same_gguf(tmp_path, spm_pair):
    """transformers' GGUF tokenizer equals sentencepiece except where documented: its
    Metaspace pre-tokenizer adds no "▁" to text that already starts with a space, nor to
    text right after a special token (llama.cpp and gptlab do both)."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    sp, tok, path = spm_pair
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    same = differ = 0
    for text in [*real_texts().values(), *sms_messages()]:
        ids = ref(text, add_special_tokens=False)["input_ids"]
        if text.startswith(" "):
            assert ids == sp.encode(text[1:]) != tok.encode(text), text[:80]
            differ += 1
        else:
            assert ids == tok.encode(text), text[:80]
            assert ref(text)["input_ids"] == tok.backend.encode(text).ids  # both add BOS
            same += 1
    assert same > 5500 and differ > 0
    assert ref.convert_ids_to_tokens(ref("<s>Hello", add_special_tokens=False)["input_ids"])[:2] == ["<s>", "H"]
    assert [sp.id_to_piece(i) for i in tok.encode("<s>Hello")][:2] == ["<s>", "▁H"]
    # transformers' "llama" builder ignores tokenizer.ggml.add_space_prefix = false
    no_prefix = write_spm_gguf(tmp_path / "noprefix.gguf", sp, **{"tokenizer.ggml.add_space_prefix": False})
    ref_np = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=no_prefix.name)
    assert ref_np.convert_ids_to_tokens(ref_np("Hello", add_special_tokens=False)["input_ids"])[0] == "▁H"
    assert sp.id_to_piece(load_tokenizer(str(no_prefix)).encode("Hello")[0]) == "H"
    messages = [{"role": "user", "content": "Hi"}]
    assert ref.apply_chat_template(messages, tokenize=False) == ChatTemplate.for_tokenizer(tok).render(messages)


def test_add_bos_property_follows_the_file(tmp_path, spm_pair):
    sp, tok, _ = spm_pair
    assert tok.add_bos  # no add_bos_token key: llama.cpp's default for SentencePiece is on
    path = write_spm_gguf(tmp_path / "nobos.gguf", sp, **{"tokenizer.ggml.add_bos_token": False})
    assert not load_tokenizer(str(path)).add_bos
    smollm2 = smollm2_gguf()
    if smollm2 is not None:
        assert not load_tokenizer(str(smollm2)).add_bos  # byte-level BPE, no BOS by default


def test_streamed_continuation_keeps_the_leading_space(spm_pair):
    """SentencePiece decoders strip a text's leading space; a continuation must keep it."""
    import io

    import torch

    from gptlab.inference.detokenize import TextStreamer, continuation_text

    _, tok, _ = spm_pair
    full = tok.encode("I had always thought Jack Gisburn rather a cheap genius")
    k = next(i for i in range(len(full)) if tok.decode(full[:i]) == "I had always thought")
    prompt, new = full[:k], full[k:]  # what a model continuing the prompt would produce
    whole = tok.decode(prompt + new)
    assert tok.decode(new)[0] != " "  # the problem: decoded alone, the space is gone
    assert continuation_text(tok, prompt, new) == whole[len(tok.decode(prompt)):]
    assert continuation_text(tok, prompt, new).startswith(" Jack")
    out = io.StringIO()
    streamer = TextStreamer(tok, file=out, context_ids=prompt)
    for t in new:
        streamer(torch.tensor([t]))
    streamer.finish()
    assert out.getvalue() == " Jack Gisburn rather a cheap genius\n"
