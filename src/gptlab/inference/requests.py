"""What the engine is asked to do and what it reports back: :class:`Request`, :class:`Handle`.

A :class:`Request` carries one sequence's prompt and its own settings; the
engine returns a :class:`Handle` at once and fills it as it runs: generated
ids, events, the finish reason, the prompt's logprobs when asked. The
engine's private per-sequence state (:class:`SequenceState`) lives here too, so
that ``engine.py`` holds only the scheduler.

Shapes: V = vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from gptlab.errors import GptlabError
from gptlab.inference.events import GenerationEvent, TextStops
from gptlab.inference.sampling import Sampling, apply_presence_frequency
from gptlab.inference.stops import StopSet

MAX_LOGPROBS = 20  # OpenAI's limit on alternatives per token

Alternatives = tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass
class Request:
    """One generation request and its own settings.

    Attributes:
        prompt: the prompt's token ids (non-empty).
        max_tokens: new tokens at most (then ``finish_reason="length"``; also when the cache's
            ``max_len`` is reached first, unless ``slide``).
        temperature, top_k, top_p, min_p, repetition_penalty: as for
            :func:`~gptlab.inference.generation.generate` (temperature 0 is greedy).
        presence_penalty, frequency_penalty: OpenAI's penalties in [-2, 2] over the tokens generated
            so far (see :func:`~gptlab.inference.sampling.apply_presence_frequency`).
        seed: seed of this request's own random generator (None: a random seed).
        stops: stop token ids and stop strings (stop strings need the engine's tokenizer).
        min_tokens: stop token ids are banned until this many tokens were generated.
        logprobs: how many top alternatives (token id, logprob) each event carries, 0..20.
        prompt_logprobs: None, or N in 0..20: the handle's ``prompt_logprobs`` gets each prompt
            token's logprob given the tokens before it (and its top-N alternatives) — OpenAI's
            ``echo`` with ``logprobs``. Such a prompt is computed in full (no prefix reuse).
        text_after_prompt: the text reads on from the prompt (keeps a SentencePiece leading space);
            False for a reply that is a message of its own.
        slide: past ``max_len`` tokens keep going, each new token seeing only the last ``max_len``
            (recomputed every step, slow); a longer prompt keeps its last ``max_len`` tokens.
            What :func:`~gptlab.inference.generation.generate` does past a model's context.
        recompute: recompute the whole sequence every step instead of reusing its cache
            (the reference that cached decoding is tested against).
        logits_processor: ``(generated ids, logits (1, V)) -> logits (1, V)`` applied after the
            penalties and before sampling (e.g. a grammar's allowed-token mask); logprobs stay the model's.
    """

    prompt: Sequence[int]
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stops: StopSet | None = None
    min_tokens: int = 0
    logprobs: int = 0
    prompt_logprobs: int | None = None
    text_after_prompt: bool = True
    slide: bool = False
    recompute: bool = False
    logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None

    def sampling(self) -> Sampling:
        """The validated :class:`Sampling` part of these settings (GptlabError when out of range)."""
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise GptlabError(f"{name}={getattr(self, name)} must be in [-2, 2] (OpenAI's range)")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= MAX_LOGPROBS:
                raise GptlabError(f"{name}={n} must be in 0..{MAX_LOGPROBS}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise GptlabError(f"seed={self.seed!r} must be an integer (or None for a random seed)")
        if self.min_tokens < 0:
            raise GptlabError(f"min_tokens={self.min_tokens} must be >= 0")
        return Sampling(self.temperature, self.top_k, self.top_p, self.min_p,
                        self.repetition_penalty).validate(self.max_tokens)


@dataclass(eq=False)
class Handle:
    """What :meth:`Engine.submit` returns: the request's state as the engine runs it.

    Attributes:
        id: submission number (0, 1, ...).
        request: the request.
        tokens: the ids generated so far.
        events: every event delivered so far, in order.
        finish_reason: None while running; then ``stop``, ``length`` or ``cancelled``.
        slot: the cache slot while the request is running, else None.
        cached_tokens: prompt tokens whose keys and values were reused from an earlier sequence.
        prompt_logprobs: with ``Request.prompt_logprobs``, one ``(logprob, alternatives)`` per
            prompt token once the prompt is in (the first token's logprob is None).
    """

    id: int
    request: Request
    tokens: list[int] = field(default_factory=list)
    events: list[GenerationEvent] = field(default_factory=list)
    finish_reason: str | None = None
    slot: int | None = None
    cached_tokens: int = 0
    prompt_logprobs: list[tuple[float | None, Alternatives]] | None = None

    @property
    def done(self) -> bool:
        """Has the request finished (its last event carries the finish reason)?"""
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The text generated so far (stop strings excluded)."""
        return "".join(e.text for e in self.events)


class SequenceState:
    """The engine's private state of one running request.

    ``ids`` is the prompt plus what was generated. The slot's cache holds the
    keys of ``ids[base:base + pos]`` at positions ``0..pos-1``; ``pending`` ids
    are still to be fed. ``base`` moves only when a ``slide`` or ``recompute``
    request starts its window afresh.
    """

    def __init__(self, handle: Handle, prompt: list[int], max_new: int, sampling: Sampling,
                 tokenizer, vocab: int, device: torch.device):
        req = handle.request
        self.handle, self.prompt, self.max_new, self.sampling = handle, prompt, max_new, sampling
        self.stops = req.stops or StopSet()
        self.ids = list(prompt)
        self.base, self.pos = 0, 0
        self.counts = None  # (V,) generated occurrences, for the penalties (made when needed)
        if req.presence_penalty or req.frequency_penalty:
            self.counts = torch.zeros(vocab, device=device)
        self.banned = list(self.stops.ids) if req.min_tokens else None
        self.text = TextStops(tokenizer, self.stops, prompt if req.text_after_prompt else [])
        self.gen = None
        if sampling.temperature > 0:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(req.seed if req.seed is not None else torch.seed())
        # plain greedy: the engine can take the batch's argmax for this row
        self.plain_greedy = (sampling.temperature == 0 and self.counts is None and not self.banned
                             and sampling.repetition_penalty in (None, 1.0) and req.logits_processor is None)

    @property
    def pending(self) -> int:
        """Ids not yet in the cache (the next call feeds them)."""
        return len(self.ids) - self.base - self.pos

    @property
    def prefilling(self) -> bool:
        """Does the next call feed several ids (a prompt, a fresh window) or need the prompt's logprobs?"""
        first_call = self.handle.request.prompt_logprobs is not None and not self.handle.tokens
        return self.pending > 1 or (first_call and self.pending > 0)

    def next_token(self, logits: torch.Tensor) -> int:
        """Sample this row's next token from its float logits (V,) with its own settings and generator."""
        req = self.handle.request
        logits = logits.unsqueeze(0)  # (1, V)
        if self.counts is not None:
            logits = apply_presence_frequency(logits, self.counts.unsqueeze(0), req.presence_penalty,
                                              req.frequency_penalty)
        if req.logits_processor is not None:
            logits = req.logits_processor(self.handle.tokens, logits)
        seen = None
        if self.sampling.repetition_penalty not in (None, 1.0):
            seen = torch.tensor([self.ids], device=logits.device)  # (1, T)
        banned = self.banned if len(self.handle.tokens) < req.min_tokens else None
        return int(self.sampling.next_tokens(logits, seen, self.gen, banned=banned)[0])

    def restart_window(self, max_len: int) -> bool:
        """For ``slide``/``recompute``: start a fresh window of the last ``max_len`` ids when needed.

        True when the slot's cache must be cleared (positions restart at 0).
        """
        req = self.handle.request
        if req.recompute or (req.slide and len(self.ids) - self.base > max_len):
            self.base, self.pos = max(0, len(self.ids) - max_len), 0
            return True
        return False

    def cached_ids(self, ring: int | None) -> list[int]:
        """The ids whose keys the slot holds from position 0 (for prefix reuse); [] once a ring wrapped."""
        if ring is not None and self.pos > ring:
            return []
        return self.ids[self.base:self.base + self.pos]


def top_alternatives(logprobs: torch.Tensor, n: int) -> Alternatives:
    """The ``n`` most likely (token id, logprob) of a (V,) row of logprobs."""
    if not n:
        return ()
    values, ids = torch.topk(logprobs, n)
    return tuple(zip(ids.tolist(), values.tolist()))


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
