"""The batched engine: many sequences at once, each in its own slot of one KV cache, each at its own position.

    engine = Engine(model, tokenizer, max_batch=8)
    h = engine.submit(Request(prompt_ids, max_tokens=64, temperature=0.7, seed=1))
    for handle, event in engine.run():       # or engine.stream(h) for one request's events
        ...                                  # GenerationEvent(token_id, text, logprob, finish_reason, top_logprobs)

Every way gptlab generates text runs here: ``generate`` and
``generate_events``, chat, the in-process judge, instruction responses,
distillation's teacher, the server. Each :meth:`Engine.step` is one
scheduler iteration (continuous batching):

1. admit waiting requests into free slots of the
   :class:`~gptlab.models.attention.SlotCache`. With prefix reuse, a request
   goes to the free slot whose cached tokens share the longest prefix with its
   prompt (a chat's earlier turns, a shared system prompt) and starts after it;
2. prefill the admitted prompts: one model call per prompt (prompts of
   different lengths are never padded to each other), at most
   ``prefill_chunk`` prompt tokens per step in all, so a long prompt is spread
   over several steps and does not stall the sequences already decoding. The
   output head runs on a prompt's last position only (on all of them when the
   prompt's own logprobs were asked for);
3. one batched decode call for every sequence with one token to feed, each row
   at its own position (``SlotCache.rows(slots, positions)``).

A sequence that finishes (stop token or string, ``max_tokens``) or is
cancelled frees its slot at once; the next step admits a waiting one there.
Sampling is per row with one ``torch.Generator`` per request, so a seeded
request gives the same tokens whatever else is in the batch (tested).

Shapes: B = sequences in a call, T = tokens per row in a call, V = vocabulary size.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator

import torch

from gptlab.errors import GptlabError
from gptlab.inference.events import CANCELLED, LENGTH, GenerationEvent, token_event
from gptlab.inference.graphs import DecodeGraph, capture_applies, static_applies
from gptlab.inference.requests import (MAX_LOGPROBS, Handle, Request, SequenceState, common_prefix,
                                       top_alternatives)

__all__ = ["Engine", "Handle", "MAX_LOGPROBS", "Request"]


class Engine:
    """Continuous batching over one model: submit requests, step the scheduler, read events.

    Args:
        model: a gptlab :class:`~gptlab.models.base.LanguageModel` (put in eval mode).
        tokenizer: turns tokens into text pieces (needed for stop strings); None: events carry no text.
        max_batch: sequences that run at once (the slot cache's rows).
        max_len: tokens per sequence, prompt included (default and at most: the model's context).
        prefill_chunk: prompt tokens prefilled per step, over all new requests.
        prefix_reuse: start a prompt after the longest prefix a free slot still holds.
        static_decode: decode through :class:`~gptlab.inference.graphs.DecodeGraph`, every slot in fixed
            shapes, captured as CUDA graphs where :func:`~gptlab.inference.graphs.capture_applies` (CUDA,
            unless ``GPTLAB_CUDA_GRAPHS=0``). None (default): where it is captured (not for a mixture of
            experts); True: also elsewhere, uncaptured. Never with a sliding-window ring.
    """

    def __init__(self, model, tokenizer=None, max_batch: int = 8, max_len: int | None = None,
                 prefill_chunk: int = 256, prefix_reuse: bool = True, static_decode: bool | None = None):
        if max_batch < 1 or prefill_chunk < 1:
            raise GptlabError(f"max_batch={max_batch} and prefill_chunk={prefill_chunk} must be >= 1")
        if max_len is not None and max_len < 2:
            raise GptlabError(f"max_len={max_len} must be >= 2 (a prompt token and a new one)")
        self.model, self.tokenizer, self.prefill_chunk = model.eval(), tokenizer, prefill_chunk
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        static = static_applies(model, device) if static_decode is None else static_decode
        self.cache = (model.new_slot_cache(max_batch, max_len, spare=True) if static
                      else model.new_slot_cache(max_batch, max_len))
        self.device = self.cache.k[0].device
        self.graph = DecodeGraph(model, self.cache, capture_applies(device)) if self.cache.spare else None
        self.prefix_reuse = prefix_reuse
        self.free = list(range(max_batch))  # free slots, lowest first
        self.slot_ids: list[list[int]] = [[] for _ in range(max_batch)]  # ids cached in each free slot
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []  # in admission order
        self._pending: list[tuple[Handle, GenerationEvent]] = []  # events delivered by the next step
        self._seqs: dict[int, SequenceState] = {}
        self._next_id = 0
        self.last_handle: Handle | None = None  # the latest submission (what a caller of generate_events can inspect)

    # ---- the API ----
    def submit(self, request: Request) -> Handle:
        """Queue a request; it joins the running batch at the next step with a free slot."""
        sampling = request.sampling()
        prompt = self._prompt(request)
        if request.stops is not None and request.stops.strings and self.tokenizer is None:
            raise GptlabError("stop strings need the tokenizer: Engine(model, tokenizer)")
        handle = self.last_handle = Handle(self._next_id, request)
        self._next_id += 1
        max_new = request.max_tokens
        if not request.slide:
            max_new = min(max_new, self.cache.max_len - len(prompt))
        if max_new == 0 and request.prompt_logprobs is None:
            self._deliver(handle, GenerationEvent(None, "", None, LENGTH))
            return handle
        seq = SequenceState(handle, prompt, max_new, sampling, self.tokenizer, self.model.cfg.vocab_size,
                            self.device)
        if request.slide and len(prompt) > self.cache.max_len:
            seq.base = len(prompt) - self.cache.max_len  # the window of the prompt's last tokens
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
        self._admit()
        budget = self.prefill_chunk
        for seq in [s for s in self.running if s.prefilling]:
            if budget == 0:
                break
            n = min(budget, seq.pending)
            budget -= n
            out += self._prefill(seq, n)
        decoding = sorted((s for s in self.running if not s.prefilling and s.pending == 1),
                          key=lambda s: s.handle.slot)
        if decoding:
            out += self._emit(decoding, self._decode(decoding))
        return out

    # ---- inside a step ----
    def _admit(self) -> None:
        """Move waiting requests into free slots (with prefix reuse: the slot sharing the longest prefix)."""
        while self.waiting and self.free:
            seq = self.waiting.popleft()
            slot, reuse = self.free[0], 0
            if self.prefix_reuse and seq.handle.request.prompt_logprobs is None and seq.base == 0:
                best = max(self.free, key=lambda s: (common_prefix(self.slot_ids[s], seq.ids), -s))
                reuse = min(common_prefix(self.slot_ids[best], seq.ids), len(seq.ids) - 1)
                slot = best if reuse > 0 else slot
            self.free.remove(slot)
            if reuse == 0:
                self.cache.clear(slot)
            seq.pos = seq.handle.cached_tokens = reuse
            seq.handle.slot = slot
            self.running.append(seq)

    def _prefill(self, seq: SequenceState, n: int) -> list[tuple[Handle, GenerationEvent]]:
        """Feed ``n`` of the sequence's pending ids; the head runs once the last pending id is in."""
        done = n == seq.pending
        want_prompt = seq.handle.request.prompt_logprobs is not None and not seq.handle.tokens
        start = seq.pos
        logits = self._forward([seq], n, head="all" if want_prompt else done)  # (1, n or 1, V) or None
        if want_prompt:
            self._record_prompt_logprobs(seq, start, logits[0])
            if not done:
                return []
            if seq.max_new == 0:  # echo only: the prompt's logprobs were all that was asked
                self._release(seq)
                self._deliver(seq.handle, GenerationEvent(None, "", None, LENGTH))
                return []
            logits = logits[:, -1]
        return self._emit([seq], logits) if done else []

    def _record_prompt_logprobs(self, seq: SequenceState, start: int, logits: torch.Tensor) -> None:
        """Logprob of each prompt id given the ids before it, from a chunk's logits (n, V) at ``start``."""
        handle, top = seq.handle, seq.handle.request.prompt_logprobs
        if handle.prompt_logprobs is None:
            handle.prompt_logprobs = [(None, ())]  # the first token has nothing before it
        logprobs = torch.log_softmax(logits, -1)  # (n, V): position i predicts id i + 1
        first = seq.base + start + 1
        nxt = seq.ids[first:first + logprobs.shape[0]]
        for i, token in enumerate(nxt):
            handle.prompt_logprobs.append((float(logprobs[i, token]), top_alternatives(logprobs[i], top)))

    def _decode(self, seqs: list[SequenceState]) -> torch.Tensor:
        """One new token for each decoding row: float logits (B, V), through the captured step if there is one."""
        if self.graph is None or self.graph.failed:  # (a failed capture: the usual slot batch, on the same cache)
            return self._forward(seqs, 1)
        logits = self.graph([s.handle.slot for s in seqs], [s.ids[s.base + s.pos] for s in seqs],
                            [s.pos for s in seqs])
        for s in seqs:
            s.pos += 1
        return logits

    def _forward(self, seqs: list[SequenceState], T: int, head: bool | str = True) -> torch.Tensor | None:
        """Feed each row's next T ids at its own positions. ``head``: True -> float logits at each row's
        last position (B, V); ``"all"`` -> at every position (B, T, V); False -> None (keys only)."""
        ids = torch.tensor([s.ids[s.base + s.pos:s.base + s.pos + T] for s in seqs], device=self.device)  # (B, T)
        slots = torch.tensor([s.handle.slot for s in seqs], device=self.device)  # (B,)
        start = torch.tensor([[s.pos] for s in seqs], device=self.device)  # (B, 1)
        positions = start + torch.arange(T, device=self.device)  # (B, T)
        h = self.model.features(ids, self.cache.rows(slots, positions))  # (B, T, d)
        for s in seqs:
            s.pos += T
        if not head:  # a prompt chunk before the last: only its keys and values were needed
            return None
        if head == "all":
            return self.model.get_head()(h).float()  # (B, T, V)
        return self.model.get_head()(h[:, -1]).float()  # (B, V): the head on the last position only

    def _emit(self, seqs: list[SequenceState], logits: torch.Tensor) -> list[tuple[Handle, GenerationEvent]]:
        """Sample each row's next token from ``logits`` (B, V), record it, and make its event."""
        logprobs = torch.log_softmax(logits, -1)  # (B, V) of the model's logits, before any filter
        greedy = logits.argmax(-1).tolist()  # one sync for every plain-greedy row
        tokens = [g if s.plain_greedy else s.next_token(row) for s, g, row in zip(seqs, greedy, logits)]
        chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
        out = []
        for seq, token, lp, row in zip(seqs, tokens, chosen, logprobs):
            handle = seq.handle
            top = top_alternatives(row, handle.request.logprobs)
            event = token_event(seq.text, seq.stops, token, lp, len(handle.tokens), seq.max_new, top)
            seq.ids.append(token)
            if seq.counts is not None:
                seq.counts[token] += 1
            handle.tokens.append(token)
            if event.finish_reason is not None:
                self._release(seq)
            elif seq.restart_window(self.cache.max_len):
                self.cache.clear(handle.slot)
            self._record(handle, event)
            out.append((handle, event))
        return out

    def _release(self, seq: SequenceState) -> None:
        """Take a running sequence out of the batch and free its slot (remembering what it caches)."""
        self.running.remove(seq)
        slot = seq.handle.slot
        self.slot_ids[slot] = seq.cached_ids(self.cache.ring)
        self.free.append(slot)
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

    def _prompt(self, request: Request) -> list[int]:
        """The prompt as a checked list of ids that leaves room for at least one new token."""
        prompt = request.prompt
        ids = prompt.flatten().tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        if not ids:
            raise GptlabError("the prompt is empty: give at least one token (e.g. a start-of-text or a word)")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise GptlabError("the prompt must be a list of integer token ids")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise GptlabError(f"the prompt holds token id {bad[0]}, outside the model's vocabulary 0..{vocab - 1}")
        too_long = len(ids) > self.cache.max_len if request.max_tokens == 0 else len(ids) >= self.cache.max_len
        if too_long and not request.slide:
            raise GptlabError(f"the prompt has {len(ids)} tokens; this engine holds {self.cache.max_len} per "
                              "sequence (prompt + new tokens): shorten the prompt or raise max_len")
        return ids
