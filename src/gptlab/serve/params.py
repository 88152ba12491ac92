"""Client JSON -> engine requests: typed fields, messages, stops, the context limit, sampling checks.

Both APIs read their bodies through :class:`Fields` (a wrong type is a 400
naming the field, never a 500) and build engine requests with
:func:`engine_request`, which applies the context limit (a prompt that leaves
no room for a reply is refused, naming both lengths; ``max_tokens`` is capped
by what the context has left) and the engine's own sampling checks.
"""

from __future__ import annotations

import json
import re

from gptlab.errors import GptlabError
from gptlab.inference.engine import Request
from gptlab.inference.stops import StopSet
from gptlab.serve.http import ApiError

MAX_N = 16  # choices per request
MAX_STOPS = 16

_KINDS = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "number": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "list": ("a list", lambda v: isinstance(v, list)),
    "dict": ("an object", lambda v: isinstance(v, dict)),
}


class Fields:
    """A client's JSON object, read field by field; ``null`` reads as the default.

    Args:
        data: the parsed body (or a nested object such as Ollama's ``options``).
        prefix: how nested fields are named in messages (``options.``).
    """

    def __init__(self, data: dict, prefix: str = ""):
        self.data, self.prefix = data, prefix

    def get(self, name: str, kind: str, default=None, lo: float | None = None, hi: float | None = None):
        """Field ``name`` checked to be of ``kind`` (int, number, bool, str, list, dict) and in [lo, hi]."""
        value = self.data.get(name)
        if value is None:
            return default
        what, ok = _KINDS[kind]
        full = self.prefix + name
        if not ok(value):
            raise ApiError(400, f"'{full}' must be {what}, got {json.dumps(value)[:40]}", param=full,
                           code="invalid_type")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            span = f"in {lo}..{hi}" if lo is not None and hi is not None else (f">= {lo}" if lo is not None
                                                                              else f"<= {hi}")
            raise ApiError(400, f"'{full}' is {value}; it must be {span}", param=full, code="invalid_value")
        return value

    def stops(self, name: str = "stop") -> list[str]:
        """A stop field: a string or a list of strings (empty ones dropped)."""
        value = self.data.get(name)
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        full = self.prefix + name
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ApiError(400, f"'{full}' must be a string or a list of strings", param=full, code="invalid_type")
        if len(items) > MAX_STOPS:
            raise ApiError(400, f"'{full}' has {len(items)} sequences; at most {MAX_STOPS}", param=full)
        return [s for s in items if s]


def text_content(content, where: str) -> str:
    """A message's content as text: a string, null (""), or a list of ``{"type": "text", "text": ...}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}: only text content parts ({{\"type\": \"text\", \"text\": ...}}) "
                                    "are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}: 'content' must be a string or a list of text parts", param="messages")


def chat_messages(value, roles: dict[str, str]) -> list[dict]:
    """Checked ``messages``: a non-empty list of {role, content}; ``roles`` maps accepted roles to template roles."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects",
                       param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
        role = m.get("role")
        if role not in roles:
            raise ApiError(400, f"messages[{i}] has role {json.dumps(role)[:30]}; the roles are "
                                f"{', '.join(roles)}", param="messages")
        out.append({"role": roles[role], "content": text_content(m.get("content"), f"messages[{i}]")})
    return out


def completion_prompts(prompt, tokenizer, vocab: int) -> list[list[int]]:
    """OpenAI's ``prompt``: a string, a list of strings, a list of ids, or a list of id lists -> id lists."""
    from gptlab.inference.generation import text_prompt_ids  # the prompt `gptlab generate` decodes from

    if isinstance(prompt, str):
        return [text_prompt_ids(tokenizer, prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [text_prompt_ids(tokenizer, p) for p in prompt]
        if all(_is_id(t) for t in prompt):
            return [_checked_ids(prompt, vocab)]
        if all(isinstance(p, list) and p and all(_is_id(t) for t in p) for p in prompt):
            return [_checked_ids(p, vocab) for p in prompt]
    raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                        "token id lists (none empty)", param="prompt")


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _checked_ids(ids: list[int], vocab: int) -> list[int]:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"the prompt holds token id {bad[0]}, outside the model's vocabulary 0..{vocab - 1}",
                       param="prompt")
    return list(ids)


def check_context(prompt: list[int], context: int, param: str) -> int:
    """Room left for the reply; 400 when the prompt leaves none (naming both lengths)."""
    if len(prompt) >= context:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens long but the model's context holds {context} "
                            "(prompt and reply together); shorten the prompt", param=param,
                       code="context_length_exceeded")
    return context - len(prompt)


def engine_request(prompt: list[int], room: int, max_tokens: int | None, stops: StopSet, *,
                   temperature: float, top_p=None, top_k=None, min_p=None, repetition_penalty=None,
                   presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed=None, logprobs: int = 0,
                   text_after_prompt: bool = False, logits_processor=None) -> Request:
    """An engine :class:`Request`, its sampling checked (400 naming the parameter on a bad value).

    ``max_tokens`` None means "as many as the context holds"; a larger value is capped there.
    ``top_k`` of 0 or -1 turns top-k off (vLLM's and Ollama's convention).
    """
    request = Request(prompt, max_tokens=room if max_tokens is None else min(max_tokens, room),
                      temperature=temperature, top_k=None if top_k is not None and top_k <= 0 else top_k,
                      top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed,
                      stops=stops, logprobs=logprobs, text_after_prompt=text_after_prompt,
                      logits_processor=logits_processor)
    try:
        request.sampling()
    except GptlabError as e:
        match = re.match(r"(\w+)=", str(e))
        raise ApiError(400, str(e), param=match.group(1) if match else None, code="invalid_value") from None
    return request
