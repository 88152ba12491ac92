"""An Ollama ``Modelfile`` for an exported GGUF: FROM, TEMPLATE, SYSTEM, PARAMETER stop and sampling.

Ollama formats a conversation with a Go template, not the model's Jinja chat
template, so the Jinja template is translated. It is *rendered* (never parsed)
on probe conversations with sentinel contents, and the text around each
sentinel is what the template writes around a message of that role:

    [user U]                           -> lead + P_user U S_user       (+ G with the generation prompt)
    [user U, assistant A]              -> ... P_assistant A S_assistant
    [user U, assistant A, user U2]     -> ... P_user U2 S_user
    [system S, user U]                 -> P_system S S_system P_user U S_user

``lead`` is what the template writes before the first user turn when there is no
system message: nothing, or a default system message (SmolLM2's "You are a
helpful AI assistant named SmolLM ..."), which becomes the Modelfile's
``SYSTEM`` line; Ollama then sends it as the system message. A BOS text at the
start is dropped: llama.cpp adds BOS itself (``tokenizer.ggml.add_bos_token``).
The Go template is one line per role:

    {{ range .Messages }}{{ if eq .Role "system" }}P_system{{ .Content }}S_system{{ else if ... }}{{ end }}{{ end }}G

A template whose renders do not decompose this way (it reorders or rewrites
messages) is refused with one line; ``--format gguf`` still works. A model
without a chat template gets ``{{ .Prompt }}`` (plain completion).
"""

from __future__ import annotations

import inspect

from gptlab.errors import GptlabError
from gptlab.logs import get_logger

log = get_logger(__name__)

_PROBES = {"system": "GPTLAB_SYSTEM_9e1", "user": "GPTLAB_USER_4c2", "user2": "GPTLAB_USER_7d5",
           "assistant": "GPTLAB_ASSISTANT_3b8"}


def _between(text: str, start: int, sentinel: str, what: str) -> tuple[str, int]:
    """The text from ``start`` up to ``sentinel``, and the index after the sentinel."""
    at = text.find(sentinel, start)
    if at < 0:
        raise GptlabError(f"the chat template drops or rewrites the {what} message's text; it cannot be "
                          "translated into an Ollama template (use --format gguf)")
    return text[start:at], at + len(sentinel)


def _extends(longer: str, shorter: str, what: str) -> str:
    if not longer.startswith(shorter):
        raise GptlabError(f"the chat template renders a conversation differently once {what}; it cannot be "
                          "translated into an Ollama template (use --format gguf)")
    return longer[len(shorter):]


def decompose(template, bos_token: str | None = None) -> dict[str, str]:
    """What ``template`` (a ChatTemplate) writes around each role's message (see the module docstring).

    ``bos_token``: the BOS text the runtime adds by itself (dropped from the template's start), or None.

    Returns keys ``P_user``, ``S_user``, ``P_assistant``, ``S_assistant``, ``generation``,
    ``default_system`` and, when the template takes system messages, ``P_system``, ``S_system``.
    """
    u, u2, a, s = (_PROBES[k] for k in ("user", "user2", "assistant", "system"))

    def render(*turns, gen=False):
        return template.render([{"role": r, "content": c} for r, c in turns], add_generation_prompt=gen)

    r_u = render(("user", u))
    out = {"generation": _extends(render(("user", u), gen=True), r_u, "a generation prompt is asked for")}
    pre_u, end = _between(r_u, 0, u, "user")
    out["S_user"] = r_u[end:]
    r_ua = render(("user", u), ("assistant", a))
    tail = _extends(r_ua, r_u, "an assistant reply follows")
    out["P_assistant"], end = _between(tail, 0, a, "assistant")
    out["S_assistant"] = tail[end:]
    tail = _extends(render(("user", u), ("assistant", a), ("user", u2)), r_ua, "a second user turn follows")
    out["P_user"], end = _between(tail, 0, u2, "second user")
    if tail[end:] != out["S_user"] or not pre_u.endswith(out["P_user"]):
        raise GptlabError("the chat template writes the first and later user turns differently; it cannot be "
                          "translated into an Ollama template (use --format gguf)")
    lead = pre_u[:len(pre_u) - len(out["P_user"])]
    try:
        r_s = render(("system", s), ("user", u))
    except GptlabError:  # the template refuses system messages
        r_s = None
    out["default_system"] = ""
    if r_s is not None:
        out["P_system"], end = _between(r_s, 0, s, "system")
        between, _ = _between(r_s, end, u, "user")
        if not between.endswith(out["P_user"]):
            raise GptlabError("the chat template's system turn is not followed by the user turn as written "
                              "alone; it cannot be translated into an Ollama template (use --format gguf)")
        out["S_system"] = between[:len(between) - len(out["P_user"])]
    if bos_token:  # llama.cpp adds BOS itself: the template's own copy would double it
        if out.get("P_system", "").startswith(bos_token):
            out["P_system"] = out["P_system"][len(bos_token):]
        lead = lead[len(bos_token):] if lead.startswith(bos_token) else lead
    if lead:
        p, q = out.get("P_system"), out.get("S_system")
        if p is None or not (lead.startswith(p) and lead.endswith(q)) or len(lead) < len(p) + len(q):
            raise GptlabError("the chat template writes text before the first user turn that is not a system "
                              "message; it cannot be translated into an Ollama template (use --format gguf)")
        out["default_system"] = lead[len(p):len(lead) - len(q)]
    return out


def _literal(text: str) -> str:
    """Text as Go template literal text (only ``{{`` needs escaping)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(parts: dict[str, str]) -> str:
    """The Ollama (Go) template of a decomposed chat template."""
    roles = [r for r in ("system", "user", "assistant") if f"P_{r}" in parts]
    branches = "".join(f'{{{{ {"if" if n == 0 else "else if"} eq .Role "{r}" }}}}{_literal(parts["P_" + r])}'
                       f'{{{{ .Content }}}}{_literal(parts["S_" + r])}' for n, r in enumerate(roles))
    return "{{ range .Messages }}" + branches + "{{ end }}{{ end }}" + _literal(parts["generation"])




def _sampling_defaults() -> dict[str, float]:
    """The sampling ``gptlab chat`` uses by default (read from its signature: one source)."""
    from gptlab.inference.chat import chat_command

    sig = inspect.signature(chat_command).parameters
    return {k: sig[k].default for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
            if k in sig and sig[k].default is not None}


OLLAMA_PARAMS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "repetition_penalty": "repeat_penalty"}


def modelfile(gguf_name: str, tokenizer, cfg=None) -> str:
    """The ``Modelfile`` text for ``ollama create NAME -f Modelfile`` (the GGUF lies beside it).

    Args:
        gguf_name: the GGUF file's name, relative to the Modelfile.
        tokenizer: the model's gptlab tokenizer (its chat template, eos and special tokens), or None.
        cfg: the model config (its eos ids), if known.
    """
    from gptlab.inference.stops import StopSet
    from gptlab.tokenizers.chat_template import ChatTemplate

    lines = [f"FROM ./{gguf_name}", ""]
    system = ""
    if tokenizer is not None and tokenizer.chat_template:
        bos = tokenizer.bos_token if tokenizer.add_bos else None  # SmolLM2's BOS is <|im_start|>: kept
        parts = decompose(ChatTemplate.for_tokenizer(tokenizer), bos)
        template, system = go_template(parts), parts["default_system"]
    else:
        template = "{{ .Prompt }}"
    if '"""' in template or '"""' in system:
        raise GptlabError('the chat template contains """, which a Modelfile cannot quote')
    lines.append(f'TEMPLATE """{template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines.append("")
    if tokenizer is not None:
        stops = StopSet.for_model(tokenizer, cfg)
        names = {i: t for t, i in tokenizer.special_tokens.items()}
        for s in dict.fromkeys([names.get(i, tokenizer.decode([i])) for i in stops.ids] + list(stops.strings)):
            if '"' in s or "\n" in s:  # a Modelfile value is one quoted line
                log.warning("stop string %r cannot be written as a Modelfile PARAMETER; left out", s)
            else:
                lines.append(f'PARAMETER stop "{s}"')
    for ours, value in _sampling_defaults().items():
        lines.append(f"PARAMETER {OLLAMA_PARAMS[ours]} {value:g}")
    return "\n".join(lines) + "\n"


__all__ = ["decompose", "go_template", "modelfile"]
