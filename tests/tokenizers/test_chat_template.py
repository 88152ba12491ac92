"""Chat templates render exactly like transformers' apply_chat_template(..., tokenize=False)."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from gptlab.errors import GptlabError
from gptlab.tokenizers.chat_template import (ALPACA_PREAMBLE, BUILTIN_TEMPLATES, ChatTemplate,
                                             apply_chat_template)

transformers = pytest.importorskip("transformers")

SMOLLM2 = (  # SmolLM2-Instruct's template, as stored in its GGUF / tokenizer_config.json
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A template exercising what real ones use: whitespace control, loop controls, namespace,
# tojson with non-ASCII, raise_exception, bos/eos tokens, {% generation %}.
FANCY = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('bad role ' + m['role']) }}
    {% endif %}
    {% if m['role'] == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    [{{ ns.n }}] {{ m['role'] | upper }}: {{ m['content'] | trim }}
    {% if m['role'] == 'assistant' %}{% generation %}{{ m | tojson }}{% endgeneration %}{{ eos_token }}{% endif %}
{% endfor %}
{% if add_generation_prompt %}[{{ ns.n + 1 }}] ASSISTANT:{% endif %}"""

CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system+user": [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Name a prime number."}],
    "multi-turn": [{"role": "system", "content": "Be kind."},
                   {"role": "user", "content": "  Hi!  "},
                   {"role": "assistant", "content": "Hello — how can I help? ☕"},
                   {"role": "user", "content": "Tell me a joke about café naïveté.\nTwo lines."}],
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def _reference(hf, template, messages, gen):
    return hf.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)


@pytest.mark.parametrize("template_name", ["smollm2", "fancy", *BUILTIN_TEMPLATES])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_matches_transformers(hf_tokenizer, template_name, conv, gen):
    source = {"smollm2": SMOLLM2, "fancy": FANCY}.get(template_name, BUILTIN_TEMPLATES.get(template_name))
    messages = CONVERSATIONS[conv]
    ours = ChatTemplate(source, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    assert ours.render(messages, add_generation_prompt=gen) == _reference(hf_tokenizer, source, messages, gen)


def test_builtin_styles_known_strings():
    msgs = CONVERSATIONS["user"]
    # Alpaca = the course's chapter 7 format: preamble, instruction, response header.
    assert apply_chat_template(msgs, "alpaca", add_generation_prompt=True) == (
        ALPACA_PREAMBLE + "\n\n### Instruction:\nWhat is the capital of France?\n\n### Response:\n")
    assert apply_chat_template(msgs, "chatml", True) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    # Phi-3 = the course's chapter 7 format: role headers, no <|end|> (the answer ends with end-of-text).
    assert apply_chat_template(msgs, "phi-3", True) == "<|user|>\nWhat is the capital of France?\n<|assistant|>\n"
    assert apply_chat_template(msgs, "phi3", True) == apply_chat_template(msgs, "phi-3", True)  # the alias
    assert apply_chat_template(msgs, "llama-3", True, bos_token="<|begin_of_text|>") == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ChatTemplate("chatml").stop_token == "<|im_end|>"
    assert ChatTemplate("phi3").name == "phi-3" and ChatTemplate("phi-3").stop_strings == ["\n<|user|>"]


def test_for_tokenizer():
    class Tok:
        chat_template = SMOLLM2
        bos_token, eos_token = "<|im_start|>", "<|im_end|>"

    t = ChatTemplate.for_tokenizer(Tok())
    assert t.render(CONVERSATIONS["user"], True).startswith("<|im_start|>system\nYou are a helpful AI")
    assert ChatTemplate.for_tokenizer(Tok(), style="phi-3").name == "phi-3"
    assert ChatTemplate.for_tokenizer(Tok(), style="phi3").name == "phi-3"
    assert ChatTemplate.for_tokenizer(Tok(), style="chat").source == SMOLLM2  # chat = the tokenizer's own
    Tok.chat_template = None
    with pytest.raises(GptlabError, match="no chat template; pick a built-in prompt style"):
        ChatTemplate.for_tokenizer(Tok())
    with pytest.raises(GptlabError, match="unknown prompt style 'vicuna'"):
        ChatTemplate.for_tokenizer(Tok(), style="vicuna")


def test_bad_input():
    with pytest.raises(GptlabError, match="refused the conversation: bad role tool"):
        ChatTemplate(FANCY).render([{"role": "tool", "content": "x"}])
    with pytest.raises(GptlabError, match="syntax error at line 1"):
        ChatTemplate("{% for m in messages %}{{ m }")
    with pytest.raises(GptlabError, match="must be a list"):
        ChatTemplate("chatml").render("hello")
    with pytest.raises(GptlabError, match="message 0 must be a dict with 'role' and 'content'"):
        ChatTemplate("chatml").render([{"text": "hi"}])
    with pytest.raises(GptlabError, match="conversation is empty"):
        ChatTemplate("chatml").render([])
    with pytest.raises(GptlabError, match="only user and assistant turns"):
        apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "alpaca")
    # The sandbox blocks attribute access to Python internals.
    with pytest.raises(GptlabError, match="failed to render"):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render([{"role": "user", "content": "x"}])
