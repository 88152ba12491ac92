"""When generation stops: one :class:`StopSet` for ``generate``, ``chat``, the judge and responses.

A reply ends at the first of

- a stop *token*: the tokenizer's end-of-text (``eos_token``), the model
  config's ``eos_id`` (an int, or a list as in Llama 3's config.json), and the
  chat template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``<|end|>``,
  ``<end_of_turn>`` ...). The end-of-turn token is read off the template itself:
  a probe conversation is rendered and the tokenizer's special token that
  follows the assistant's text is the one that closes a turn. No per-format
  list of names is kept;
- a stop *string*: text that ends a reply in formats without such a token
  (``alpaca``: the next ``### `` section), plus any the caller adds. A stop
  string is matched on the decoded text, across token boundaries, and is never
  part of the reply.

A StopSet is immutable and small, so each request (and later each sequence of
a batched engine) carries its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from gptlab.errors import GptlabError

# Stands for the assistant's text in the probe conversation; what the template writes after it closes the turn.
_PROBE = "gptlab_probe_reply"


def _ids(value) -> list[int]:
    """An eos setting as a list: None -> [], 7 -> [7], [7, 9] -> [7, 9]."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def end_of_turn_tokens(template, tokenizer) -> list[str]:
    """The tokenizer's special tokens that the chat ``template`` writes to close an assistant turn.

    Args:
        template: a :class:`~gptlab.tokenizers.chat_template.ChatTemplate`.
        tokenizer: its tokenizer (``special_tokens``: string -> id).
    """
    specials = getattr(tokenizer, "special_tokens", None) or {}
    found = [template.stop_token] if template.stop_token in specials else []
    probes = ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}],
              [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
               {"role": "assistant", "content": _PROBE}])
    for messages in probes:  # some templates insist on (or refuse) a system message
        try:
            text = template.render(messages)
        except GptlabError:
            continue
        at = text.find(_PROBE)
        if at < 0:
            continue
        after = text[at + len(_PROBE):].lstrip(" \n")
        closing = [s for s in specials if s and after.startswith(s)]
        if closing:
            found.append(max(closing, key=len))
        break
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class StopSet:
    """Token ids and strings that end generation.

    Attributes:
        token_ids: ids that end a sequence; the stop token itself is not part of the text.
        strings: texts that end a sequence; matched on decoded text, never emitted.
    """

    token_ids: frozenset[int] = frozenset()
    strings: tuple[str, ...] = field(default=())

    @classmethod
    def for_model(cls, tokenizer, cfg=None, template=None, strings: Iterable[str] = ()) -> "StopSet":
        """The stops of a model: eos from ``tokenizer`` and ``cfg``, the template's end-of-turn, ``strings``.

        Args:
            tokenizer: a gptlab tokenizer (its ``eos_id``, ``special_tokens`` and ``chat_template``).
            cfg: the model's config (its ``eos_id``: int, list or None), if known.
            template: a ChatTemplate, a template source or built-in style name; None: the tokenizer's
                own chat template (if it has one).
            strings: extra stop strings.
        """
        from gptlab.tokenizers.chat_template import ChatTemplate

        ids = _ids(getattr(tokenizer, "eos_id", None)) + _ids(getattr(cfg, "eos_id", None))
        extra = list(strings)
        if template is None and getattr(tokenizer, "chat_template", None):
            try:
                template = ChatTemplate.for_tokenizer(tokenizer)
            except GptlabError:  # a template that does not compile: chat reports it; plain decoding goes on
                template = None
        elif isinstance(template, str):  # the template sees the tokenizer's tokens (Mistral's writes eos_token)
            template = ChatTemplate(template, **{k: getattr(tokenizer, k, None)
                                                 for k in ("bos_token", "eos_token", "pad_token", "unk_token")})
        if template is not None:
            specials = tokenizer.special_tokens
            ids += [specials[name] for name in end_of_turn_tokens(template, tokenizer)]
            extra = list(template.stop_strings) + extra
        return cls(frozenset(ids), tuple(dict.fromkeys(s for s in extra if s)))

    def with_strings(self, strings: Iterable[str]) -> "StopSet":
        """This set plus more stop strings."""
        return StopSet(self.token_ids, tuple(dict.fromkeys((*self.strings, *strings))))

    @property
    def ids(self) -> list[int]:
        """The stop token ids, sorted (what ``generate(eos_id=...)`` takes)."""
        return sorted(self.token_ids)

    def is_stop(self, token_id: int) -> bool:
        """Does ``token_id`` end a sequence?"""
        return token_id in self.token_ids

    def find(self, text: str) -> int | None:
        """Index in ``text`` where the earliest stop string starts, or None."""
        hits = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return min(hits) if hits else None

    def holdback(self, text: str) -> int:
        """How many trailing characters of ``text`` could be the start of a stop string (not safe to show yet)."""
        longest = 0
        for s in self.strings:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
