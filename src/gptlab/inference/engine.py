"""The batched engine: many sequences at once, each in its own slot of one KV cache, each at its own position.

    engine = Engine(model, tokenizer, max_batch=8)
    h = engine.submit(Request(prompt_ids, max_tokens=64, temperature=0.7, seed=1))
    for handle, event in engine.run():       # or engine.stream(h) for one request's events
        ...                                  # GenerationEvent(token_id, text, logprob, finish_reason, top_logprobs)

Each :meth:`Engine.step` is one scheduler iteration (continuous batching):

1. admit waiting requests into free slots of the :class:`~gptlab.models.attention.SlotCache`;
2. prefill the admitted prompts: one model call per prompt (prompts of
   different lengths are never padded to each other), at most
   ``prefill_chunk`` prompt tokens per step in all, so a long prompt is spread
   over several steps and does not stall the sequences already decoding. The
   output head runs on a prompt's last position only;
3. one batched decode call for every running sequence, each row at its own
   position (``SlotCache.rows(slots, positions)``).

A sequence that finishes (stop token or string, ``max_tokens``) or is
cancelled frees its slot at once; the next step admits a waiting one there.
Sampling is per row with one ``torch.Generator`` per request, so a seeded
request gives the same tokens whatever else is in the batch (tested).

Shapes: B = sequences in a call, T = tokens per row in a call, V = vocabulary size.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from gptlab.errors import GptlabError
from gptlab.inference.generation import CANCELLED, LENGTH, GenerationEvent, TextStops, token_event
from gptlab.inference.sampling import Sampling, apply_presence_frequency
from gptlab.inference.stops import StopSet

MAX_LOGPROBS = 20  # OpenAI's limit on alternatives per token


@dataclass
class Request:
    """One generation request and its own settings.

    Attributes:
        prompt: the prompt's token ids (non-empty).
        max_tokens: new tokens at most (then ``finish_reason="length"``; also when the cache's
            ``max_len`` is reached first).
        temperature, top_k, top_p, min_p, repetition_penalty: as for
            :func:`~gptlab.inference.generation.generate` (temperature 0 is greedy).
        presence_penalty, frequency_penalty: OpenAI's penalties in [-2, 2] over the tokens generated
            so far (see :func:`~gptlab.inference.sampling.apply_presence_frequency`).
        seed: seed of this request's own random generator (None: a random seed).
        stops: stop token ids and stop strings (stop strings need the engine's tokenizer).
        logprobs: how many top alternatives (token id, logprob) each event carries, 0..20.
        text_after_prompt: the text reads on from the prompt (keeps a SentencePiece leading space);
            False for a reply that is a message of its own.
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
    logprobs: int = 0
    text_after_prompt: bool = True
    logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None

    def sampling(self) -> Sampling:
        """The validated :class:`Sampling` part of these settings (GptlabError when out of range)."""
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise GptlabError(f"{name}={getattr(self, name)} must be in [-2, 2] (OpenAI's range)")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise GptlabError(f"logprobs={self.logprobs} must be in 0..{MAX_LOGPROBS}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise GptlabError(f"seed={self.seed!r} must be an integer (or None for a random seed)")
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
    """

    id: int
    request: Request
    tokens: list[int] = field(default_factory=list)
    events: list[GenerationEvent] = field(default_factory=list)
    finish_reason: str | None = None
    slot: int | None = None

    @property
    def done(self) -> bool:
        """Has the request finished (its last event carries the finish reason)?"""
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The text generated so far (stop strings excluded)."""
        return "".join(e.text for e in self.events)


class _Sequence:
    """The engine's private state of one running request: ids, cache position, sampler, text."""

    def __init__(self, handle: Handle, prompt: list[int], max_new: int, sampling: Sampling,
                 tokenizer, vocab: int, device: torch.device):
        req = handle.request
        self.handle, self.prompt, self.max_new, self.sampling = handle, prompt, max_new, sampling
        self.stops = req.stops or StopSet()
        self.ids = list(prompt)  # prompt + generated, for the repetition penalty and the next input
        self.pos = 0  # tokens already in the cache
        self.counts = torch.zeros(vocab, device=device)  # (V,) generated occurrences, for the penalties
        self.text = TextStops(tokenizer, self.stops, prompt if req.text_after_prompt else [])
        self.gen = None
        if sampling.temperature > 0:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(req.seed if req.seed is not None else torch.seed())

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.prompt)

    def next_token(self, logits: torch.Tensor) -> int:
        """Sample this row's next token from its float logits (V,) with its own settings and generator."""
        req = self.handle.request
        logits = apply_presence_frequency(logits.unsqueeze(0), self.counts.unsqueeze(0),
                                          req.presence_penalty, req.frequency_penalty)  # (1, V)
        if req.logits_processor is not None:
            logits = req.logits_processor(self.handle.tokens, logits)
        seen = torch.tensor([self.ids], device=logits.device)  # (1, T) for the repetition penalty
        return int(self.sampling.next_tokens(logits, seen, self.gen)[0])


class Engine:
    """Continuous batching over one model: submit requests, step the scheduler, read events.

    Args:
        model: a gptlab :class:`~gptlab.models.base.LanguageModel` (put in eval mode).
        tokenizer: turns tokens into text pieces (needed for stop strings); None: events carry no text.
        max_batch: sequences that run at once (the slot cache's rows).
        max_len: tokens per sequence, prompt included (default and at most: the model's context).
        prefill_chunk: prompt tokens prefilled per step, over all new requests.
    """

    def __init__(self, model, tokenizer=None, max_batch: int = 8, max_len: int | None = None,
                 prefill_chunk: int = 256):
        if max_batch < 1 or prefill_chunk < 1:
            raise GptlabError(f"max_batch={max_batch} and prefill_chunk={prefill_chunk} must be >= 1")
        if max_len is not None and max_len < 2:
            raise GptlabError(f"max_len={max_len} must be >= 2 (a prompt token and a new one)")
        self.model, self.tokenizer, self.prefill_chunk = model.eval(), tokenizer, prefill_chunk
        self.cache = model.new_slot_cache(max_batch, max_len)
        self.device = self.cache.k[0].device
        self.free = list(range(max_batch))  # free slots, lowest first
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []  # in admission order
        self._pending: list[tuple[Handle, GenerationEvent]] = []  # events delivered by the next step
        self._seqs: dict[int, _Sequence] = {}
        self._next_id = 0

    # ---- the API ----
    def submit(self, request: Request) -> Handle:
        """Queue a request; it joins the running batch at the next step with a free slot."""
        sampling = request.sampling()
        prompt = self._prompt(request.prompt)
        if request.stops is not None and request.stops.strings and self.tokenizer is None:
            raise GptlabError("stop strings need the tokenizer: Engine(model, tokenizer)")
        handle = Handle(self._next_id, request)
        self._next_id += 1
        max_new = min(request.max_tokens, self.cache.max_len - len(prompt))
        if max_new == 0:
            self._deliver(handle, GenerationEvent(None, "", None, LENGTH))
            return handle
        seq = _Sequence(handle, prompt, max_new, sampling, self.tokenizer, self.model.cfg.vocab_size, self.device)
        self._seqs[handle.id] = seq
        self.waiting.append(seq)
        return handle

    def cancel(self, handle: Handle) -> None:
        """End a request now: its slot is free at once; its ``cancelled`` event comes with the next step."""
        seq = self._seqs.get(handle.id)
        if seq is None or handle.done:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
            del self._seqs[handle.id]
        else:
            self._release(seq)
        self._deliver(handle, GenerationEvent(None, seq.text.flush(), None, CANCELLED))

    @property
    def busy(self) -> bool:
        """Is anything waiting, running or still to be delivered?"""
        return bool(self.waiting or self.running or self._pending)

    def run(self) -> Iterator[tuple[Handle, GenerationEvent]]:
        """Step until every submitted request has finished, yielding ``(handle, event)`` as they come.

        Requests may be submitted or cancelled between events.
        """
        while self.busy:
            yield from self.step()

    def stream(self, handle: Handle) -> Iterator[GenerationEvent]:
        """One request's events, stepping the engine as needed (other requests advance too)."""
        seen = 0
        while True:
            while seen < len(handle.events):
                seen += 1
                yield handle.events[seen - 1]
            if handle.done:
                return
            self.step()

    @torch.inference_mode()
    def step(self) -> list[tuple[Handle, GenerationEvent]]:
        """One scheduler iteration: admit, prefill (chunked), one batched decode; the events it produced."""
        out, self._pending = self._pending, []
        while self.waiting and self.free:
            seq = self.waiting.popleft()
            seq.handle.slot = self.free.pop(0)
            self.running.append(seq)
        budget = self.prefill_chunk
        for seq in [s for s in self.running if s.prefilling]:
            if budget == 0:
                break
            n = min(budget, len(seq.prompt) - seq.pos)
            budget -= n
            logits = self._forward([seq], n, head=n == len(seq.prompt) - seq.pos)
            if logits is not None:  # the prompt is in: its last position gives the first token
                out.append(self._emit(seq, logits[0]))
        decoding = sorted((s for s in self.running if not s.prefilling), key=lambda s: s.handle.slot)
        if decoding:
            logits = self._forward(decoding, 1)
            out += [self._emit(seq, row) for seq, row in zip(decoding, logits)]
        return out

    # ---- inside a step ----
    def _forward(self, seqs: list[_Sequence], T: int, head: bool = True) -> torch.Tensor | None:
        """Feed each row's next T tokens (the prompt's next chunk, or the last sampled token) at its
        own positions; with ``head``, the float logits at each row's last position, (B, V)."""
        ids = torch.tensor([s.ids[s.pos:s.pos + T] for s in seqs], device=self.device)  # (B, T)
        slots = torch.tensor([s.handle.slot for s in seqs], device=self.device)  # (B,)
        start = torch.tensor([[s.pos] for s in seqs], device=self.device)  # (B, 1)
        positions = start + torch.arange(T, device=self.device)  # (B, T)
        h = self.model.features(ids, self.cache.rows(slots, positions))  # (B, T, d)
        for s in seqs:
            s.pos += T
        if not head:  # a prompt chunk before the last: only its keys and values were needed
            return None
        return self.model.get_head()(h[:, -1]).float()  # (B, V): the head on the last position only

    def _emit(self, seq: _Sequence, logits: torch.Tensor) -> tuple[Handle, GenerationEvent]:
        """Sample ``seq``'s next token from its logits (V,), record it, and make its event."""
        handle = seq.handle
        logprobs = torch.log_softmax(logits, -1)  # (V,) of the model's logits, before any filter
        token = seq.next_token(logits)
        top = ()
        if handle.request.logprobs:
            values, ids = torch.topk(logprobs, handle.request.logprobs)
            top = tuple(zip(ids.tolist(), values.tolist()))
        event = token_event(seq.text, seq.stops, token, float(logprobs[token]), len(handle.tokens),
                            seq.max_new, top)
        seq.ids.append(token)
        seq.counts[token] += 1
        handle.tokens.append(token)
        if event.finish_reason is not None:
            self._release(seq)
        self._record(handle, event)
        return handle, event

    def _release(self, seq: _Sequence) -> None:
        """Take a running sequence out of the batch and free its slot."""
        self.running.remove(seq)
        self.free.append(seq.handle.slot)
        self.free.sort()
        seq.handle.slot = None
        del self._seqs[seq.handle.id]

    def _record(self, handle: Handle, event: GenerationEvent) -> None:
        handle.events.append(event)
        if event.finish_reason is not None:
            handle.finish_reason = event.finish_reason

    def _deliver(self, handle: Handle, event: GenerationEvent) -> None:
        """An event that the next step hands out (a cancellation, an empty request)."""
        self._record(handle, event)
        self._pending.append((handle, event))

    def _prompt(self, prompt) -> list[int]:
        """The prompt as a checked list of ids that leaves room for at least one new token."""
        ids = prompt.flatten().tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        if not ids:
            raise GptlabError("the prompt is empty: give at least one token (e.g. a start-of-text or a word)")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise GptlabError("the prompt must be a list of integer token ids")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise GptlabError(f"the prompt holds token id {bad[0]}, outside the model's vocabulary 0..{vocab - 1}")
        if len(ids) >= self.cache.max_len:
            raise GptlabError(f"the prompt has {len(ids)} tokens; this engine holds {self.cache.max_len} per "
                              "sequence (prompt + new tokens): shorten the prompt or raise max_len")
        return ids
