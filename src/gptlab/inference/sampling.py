"""Sampling: the per-step pipeline that turns the last position's logits (B, V) into next tokens.

    repetition penalty -> temperature -> top-k -> top-p (nucleus) -> min-p -> sample

Temperature 0 means greedy (argmax). :class:`Sampling` holds one request's
settings, validated once, so a decoding loop (and later each sequence of a
batched engine) carries them as one value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptlab.errors import GptlabError


def validate_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                      min_p: float | None = None, max_new_tokens: int = 1,
                      repetition_penalty: float | None = None) -> None:
    """Raise a clear GptlabError for out-of-range sampling values."""
    if temperature is None or temperature < 0:
        raise GptlabError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise GptlabError(f"top_k={top_k} must be >= 1 (or omitted to disable)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GptlabError(f"top_p={top_p} must be in (0, 1] (1 disables nucleus sampling)")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise GptlabError(f"min_p={min_p} must be in [0, 1]")
    if max_new_tokens < 0:
        raise GptlabError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise GptlabError(f"repetition_penalty={repetition_penalty} must be > 0 (1 disables it)")


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, min_p: float | None = None) -> torch.Tensor:
    """Apply temperature and the top-k / top-p / min-p filters to (B, V) logits.

    Filtered-out entries become -inf; the most likely token always survives.
    """
    logits = logits.float() / max(temperature, 1e-8)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (keeps >= 1 token).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p is not None and min_p > 0.0:
        probs = logits.softmax(-1)
        threshold = min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: float = 0.0,
                             frequency: float = 0.0) -> torch.Tensor:
    """OpenAI's presence and frequency penalties on (B, V) logits.

    ``counts`` (B, V): how often each token was generated so far. Following
    https://platform.openai.com/docs/advanced-usage (parameter details):
    ``logits[j] - counts[j] * frequency - (counts[j] > 0) * presence``: presence
    subtracts a constant once a token has appeared, frequency once per occurrence.
    """
    if not presence and not frequency:
        return logits
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def _apply_repetition_penalty(logits: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (Keskar et al. 2019): divide positive / multiply negative logits of seen tokens."""
    seen = torch.gather(logits, 1, seqs)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, seqs, seen)


@dataclass(frozen=True)
class Sampling:
    """One request's sampling settings (see :func:`filter_logits`); ``temperature=0`` is greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def validate(self, max_new_tokens: int = 1) -> "Sampling":
        """Raise a GptlabError for an out-of-range value; returns self."""
        validate_sampling(self.temperature, self.top_k, self.top_p, self.min_p, max_new_tokens,
                          self.repetition_penalty)
        return self

    def next_tokens(self, logits: torch.Tensor, seqs: torch.Tensor, generator: torch.Generator | None,
                    banned: list[int] | None = None) -> torch.Tensor:
        """Pick the next token of each row: (B, V) float logits, (B, T) ids so far -> (B,) ids.

        ``banned`` ids get -inf first (eos before ``min_new_tokens``).
        """
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            logits = _apply_repetition_penalty(logits, seqs, self.repetition_penalty)
        if banned:
            logits = logits.clone()
            logits[:, banned] = float("-inf")
        if self.temperature == 0:
            return logits.argmax(-1)
        filtered = filter_logits(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                 min_p=self.min_p)
        return torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(-1)
