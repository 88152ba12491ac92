"""Chat templates: turning a conversation into the one prompt string a model was tuned on.

A conversation is a list of messages ``{"role": "system"|"user"|"assistant", "content": str}``.
Instruction-tuned models ship a Jinja2 template for it (``chat_template`` in
``tokenizer_config.json``, or ``tokenizer.chat_template`` in a GGUF file). We
render it the way Hugging Face ``apply_chat_template(..., tokenize=False)``
does, so prompts are byte-identical (tested):

- a *sandboxed*, immutable Jinja environment (templates are untrusted input),
  with ``trim_blocks`` and ``lstrip_blocks`` on and the ``loopcontrols`` extension;
- the ``tojson`` filter keeping non-ASCII text as is, and the globals
  ``raise_exception(msg)`` and ``strftime_now(fmt)``;
- the context: ``messages``, ``add_generation_prompt`` and the tokenizer's
  special tokens (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``).

``add_generation_prompt=True`` appends the header that opens the assistant's
turn (e.g. ``<|im_start|>assistant\\n``), so the model's continuation is the reply.

Models without a template (a GPT-2 you fine-tuned yourself) can use one of the
built-in prompt styles in :data:`BUILTIN_TEMPLATES`: ``alpaca`` and ``phi-3``
(the course's two chapter-7 instruction formats), ``chatml`` and ``llama-3``.
These are the only definitions of the styles: ``gptlab finetune instruct
--style`` renders its training prompts with them and ``gptlab chat --style``
its conversations, so a model tuned in a style chats in exactly that format.
Both commands accept the names in :data:`PROMPT_STYLES` (``phi3`` is an alias
of ``phi-3``; ``chat`` means the tokenizer's own template).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptlab.errors import GptlabError

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")

BUILTIN_TEMPLATES: dict[str, str] = {
    # The course's instruction format (chapter 7); a system message replaces the preamble.
    "alpaca": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
        "{% set rest = messages[1:] %}{% else %}{{ '" + ALPACA_PREAMBLE + "' }}{% set rest = messages %}{% endif %}"
        "{% for m in rest %}"
        "{% if m['role'] == 'user' %}{{ '\\n\\n### Instruction:\\n' + m['content'] }}"
        "{% elif m['role'] == 'assistant' %}{{ '\\n\\n### Response:\\n' + m['content'] }}"
        "{% else %}{{ raise_exception('alpaca prompts have only user and assistant turns after the system message') }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '\\n\\n### Response:\\n' }}{% endif %}"
    ),
    # The course's Phi-3 format (chapter 7): Phi-3's role headers <|user|>, <|assistant|>, each turn
    # ending in a newline; no <|end|> token: a tuned model ends its answer with end-of-text.
    "phi-3": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    # ChatML (Qwen, SmolLM2, many others): <|im_start|>role\n ... <|im_end|>\n
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Meta Llama 3 Instruct: <|begin_of_text|> then headers; contents are trimmed.
    "llama-3": (
        "{{ bos_token if bos_token else '<|begin_of_text|>' }}"
        "{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}

# The token that ends an assistant turn in each built-in style (generation stops there).
BUILTIN_STOP = {"alpaca": None, "phi-3": None, "chatml": "<|im_end|>", "llama-3": "<|eot_id|>"}
# Styles without such a token: text that opens the next section or turn also ends a reply.
BUILTIN_STOP_STRINGS = {"alpaca": ["\n\n### "], "phi-3": ["\n<|user|>"]}
STYLE_ALIASES = {"phi3": "phi-3"}  # the spelling `finetune instruct` used to record
MODEL_TEMPLATE = "chat"  # the style name for the tokenizer's own chat template
PROMPT_STYLES = (*BUILTIN_TEMPLATES, MODEL_TEMPLATE)  # what every --style accepts (plus the aliases)


def style_name(style: str) -> str:
    """The canonical name of a prompt style (``phi3`` -> ``phi-3``); an unknown name is refused."""
    name = STYLE_ALIASES.get(style, style)
    if name not in PROMPT_STYLES:
        raise GptlabError(f"unknown prompt style {style!r}; choose one of {', '.join(PROMPT_STYLES)} "
                          f"({MODEL_TEMPLATE} = the model's own chat template)")
    return name


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks): rendered as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise(message: str):
    raise GptlabError(f"the chat template refused the conversation: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise GptlabError(f"the chat template has a Jinja syntax error at line {e.lineno}: {e.message}; "
                          "fix the template or choose a built-in style") from None


def check_messages(messages: Iterable[dict]) -> list[dict]:
    """Validate a conversation: a non-empty list of {"role", "content"} dicts with string values."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
        raise GptlabError("messages must be a list of {'role': ..., 'content': ...} dicts, "
                          f"got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise GptlabError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise GptlabError(f"message {i}: 'role' and 'content' must be strings")
        out.append(m)
    if not out:
        raise GptlabError("the conversation is empty; add at least one user message")
    return out


class ChatTemplate:
    """A compiled chat template plus the special tokens it may refer to.

    Args:
        source: the Jinja template text, or the name of a built-in style
            (``alpaca``, ``phi-3``, ``chatml``, ``llama-3``).
        bos_token, eos_token, pad_token, unk_token: the strings templates see under those names.
    """

    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None):
        if not isinstance(source, str) or not source:
            raise GptlabError("a chat template must be a non-empty string (Jinja text or a built-in style name)")
        source = STYLE_ALIASES.get(source, source)
        self.name = source if source in BUILTIN_TEMPLATES else "custom"
        self.source = BUILTIN_TEMPLATES.get(source, source)
        self.stop_token = BUILTIN_STOP.get(source)
        self.stop_strings = list(BUILTIN_STOP_STRINGS.get(source, []))
        self.tokens = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token),
                                         ("pad_token", pad_token), ("unk_token", unk_token)) if v is not None}
        self._template = _compile(self.source)

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **extra: Any) -> str:
        """The prompt text for ``messages`` (as ``apply_chat_template(..., tokenize=False)``).

        Args:
            messages: the conversation.
            add_generation_prompt: end with the header that opens the assistant's reply.
            **extra: more variables for the template (e.g. ``tools``, ``date_string``).
        """
        messages = check_messages(messages)
        context = {**self.tokens, **extra, "messages": messages, "add_generation_prompt": add_generation_prompt}
        try:
            return self._template.render(**context)
        except jinja2.TemplateError as e:
            raise GptlabError(f"the chat template failed to render: {e}") from None

    @classmethod
    def for_tokenizer(cls, tokenizer, style: str | None = None) -> "ChatTemplate":
        """The tokenizer's own template, or the built-in ``style`` (which wins when given).

        Args:
            tokenizer: a gptlab Tokenizer (its ``chat_template`` and special tokens are used).
            style: a built-in style name to use instead of the tokenizer's template (``chat``: the
                tokenizer's template, as without a style).
        """
        if style is not None:
            style = style_name(style)
        if style == MODEL_TEMPLATE:
            style = None
        source = style or getattr(tokenizer, "chat_template", None)
        if not source:
            raise GptlabError("this tokenizer has no chat template; pick a built-in prompt style "
                              f"({', '.join(BUILTIN_TEMPLATES)}), e.g. --style alpaca")
        return cls(source, bos_token=getattr(tokenizer, "bos_token", None),
                   eos_token=getattr(tokenizer, "eos_token", None),
                   pad_token=getattr(tokenizer, "pad_token", None),
                   unk_token=getattr(tokenizer, "unk_token", None))


def apply_chat_template(messages: list[dict], template: str, add_generation_prompt: bool = False,
                        **tokens_and_extra: Any) -> str:
    """Render ``messages`` with ``template`` (Jinja text or a built-in style name) in one call.

    Args:
        messages: the conversation.
        template: Jinja text, or ``alpaca`` / ``phi-3`` / ``chatml`` / ``llama-3``.
        add_generation_prompt: end with the header that opens the assistant's reply.
        **tokens_and_extra: ``bos_token=``, ``eos_token=`` ... and any other template variables.
    """
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    tokens = {k: tokens_and_extra.pop(k) for k in names if k in tokens_and_extra}
    return ChatTemplate(template, **tokens).render(messages, add_generation_prompt, **tokens_and_extra)
