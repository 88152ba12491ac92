"""JSON output by grammar-constrained decoding, through llguidance (https://github.com/guidance-ai/llguidance).

``response_format: {"type": "json_object"}`` (Ollama: ``format: "json"``) and
``{"type": "json_schema", "json_schema": {"schema": ...}}`` (Ollama: ``format:
{schema}``) become a JSON schema; llguidance compiles it into a matcher that,
before every token, says which tokens of the vocabulary may come next. The
engine request's ``logits_processor`` sets the others to -inf, so greedy and
sampled replies alike are valid JSON; once the value is complete only the
stop tokens are allowed and the reply ends. Logprobs stay the model's own.

Whitespace between JSON tokens is not free (``whitespace_flexible: false``),
so a small model cannot wander off into blank lines.
"""

from __future__ import annotations

import json

import torch

from gptlab.serve.http import ApiError

BITS = torch.arange(32, dtype=torch.int32)  # one int32 word of llguidance's mask holds 32 tokens
JSON_OPTIONS = {"whitespace_flexible": False}


class JsonGrammar:
    """Builds per-request JSON masks for one tokenizer (its llguidance view is made once, on first use).

    Args:
        tokenizer: a gptlab tokenizer with a Hugging Face backend (``backend``) or a tiktoken ``encoding``.
        vocab_size: the model's vocabulary (its logits' width).
        stop_ids: the ids that end a reply (allowed once the JSON value is complete).
    """

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._lltok = None

    def _tokenizer(self):
        if self._lltok is None:
            import llguidance

            n = max(self.vocab_size, self.tokenizer.vocab_size)
            eos = self.stop_ids or None
            if hasattr(self.tokenizer, "backend"):
                self._lltok = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=n, eos_token=eos)
            elif hasattr(self.tokenizer, "encoding"):
                from llguidance.tiktoken import lltokenizer_from_encoding

                self._lltok = lltokenizer_from_encoding(self.tokenizer.encoding, n_vocab=n, eos_token=eos)
            else:
                raise ApiError(400, f"JSON output needs a Hugging Face or tiktoken tokenizer; this model's is "
                                    f"{type(self.tokenizer).__name__}", param="response_format")
        return self._lltok

    def mask(self, schema: dict) -> "JsonMask":
        """A fresh logits processor that keeps the reply inside ``schema`` (400 if the schema is invalid)."""
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        except ValueError as e:
            raise ApiError(400, f"the JSON schema is not valid: {e}", param="response_format") from None
        matcher = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ApiError(400, f"the JSON schema is not valid: {matcher.get_error()}", param="response_format")
        return JsonMask(matcher, self.vocab_size, self._tokenizer().vocab_size)


class JsonMask:
    """``(generated ids, logits (1, V)) -> logits``: tokens the grammar does not allow next become -inf."""

    def __init__(self, matcher, vocab_size: int, grammar_vocab: int):
        import llguidance.torch as lt

        self.matcher, self.V, self.fed = matcher, vocab_size, 0
        self._fill = lt.fill_next_token_bitmask
        self.bitmask = lt.allocate_token_bitmask(1, grammar_vocab)  # (1, ceil(V/32)) int32 words

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        for token in generated[self.fed:]:  # the tokens sampled since the last call
            self.matcher.consume_token(token)
        self.fed = len(generated)
        if self.matcher.is_error():  # cannot happen for tokens it allowed; then leave the logits alone
            return logits
        self._fill(self.matcher, self.bitmask)
        allowed = ((self.bitmask[0].unsqueeze(1) >> BITS) & 1).bool().flatten()[:self.V]  # (V,)
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


def schema_of(kind: str, spec) -> dict | None:
    """The JSON schema a ``response_format`` (OpenAI) or ``format`` (Ollama) asks for, or None for free text.

    Args:
        kind: ``openai`` (``{"type": "text" | "json_object" | "json_schema", ...}``) or ``ollama``
            (``"json"`` or a schema object).
        spec: the field's value.
    """
    if spec is None or spec == "":
        return None
    if kind == "ollama":
        if spec == "json":
            return {"type": "object"}
        if isinstance(spec, dict):
            return spec
        raise ApiError(400, f"format must be \"json\" or a JSON schema object, got {json.dumps(spec)[:60]}")
    if not isinstance(spec, dict) or spec.get("type") not in ("text", "json_object", "json_schema"):
        raise ApiError(400, "response_format must be {\"type\": \"text\" | \"json_object\" | \"json_schema\"}",
                       param="response_format")
    if spec["type"] == "text":
        return None
    if spec["type"] == "json_object":
        return {"type": "object"}
    inner = spec.get("json_schema")
    if not isinstance(inner, dict) or not isinstance(inner.get("schema", {}), dict):
        raise ApiError(400, "response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                       param="response_format")
    return inner.get("schema") or {}
