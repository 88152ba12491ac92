"""Generation events: one per generated token, with its text piece (stop strings held back and cut).

:class:`GenerationEvent` is what the engine, ``generate_events``, chat, the
judge and the server read; :class:`TextStops` turns tokens into safe text
pieces; :func:`token_event` decides a token's finish reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from gptlab.inference.detokenize import Detokenizer
from gptlab.inference.stops import StopSet

STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"  # finish reasons (OpenAI's names)


@dataclass(frozen=True)
class GenerationEvent:
    """One step of a generated sequence.

    Attributes:
        token_id: the token generated at this step (None on a ``cancelled`` event).
        text: the text this step adds ("" while a character or a possible stop string is held back;
            a stop token or stop string adds none).
        logprob: log-probability of ``token_id`` under the model (before sampling filters).
        finish_reason: None, or on the last event ``stop`` (a stop token or string), ``length``
            (``max_new_tokens`` reached) or ``cancelled``.
        top_logprobs: the N most likely tokens at this step as ``(token_id, logprob)``, most likely
            first, when the request asked for N alternatives (the engine's ``logprobs=N``); else ().
    """

    token_id: int | None
    text: str
    logprob: float | None
    finish_reason: str | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


class TextStops:
    """Detokenize a sequence and cut it at the first stop string, holding back what may become one."""

    def __init__(self, tokenizer, stops: StopSet, context_ids: list[int]):
        self.detok = Detokenizer(tokenizer, context_ids) if tokenizer is not None else None
        self.stops, self.held, self.stopped = stops, "", False

    def add(self, piece: str, final: bool = False) -> str:
        """Text safe to show after ``piece``; sets ``stopped`` once a stop string appeared."""
        text = self.held + piece
        cut = self.stops.find(text)
        if cut is not None:
            self.stopped, self.held = True, ""
            return text[:cut]
        keep = 0 if final else self.stops.holdback(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def push(self, token_id: int) -> str:
        return self.add(self.detok.push(token_id)) if self.detok is not None else ""

    def flush(self) -> str:
        return self.add(self.detok.flush(), final=True) if self.detok is not None else ""


def token_event(text: TextStops, stops: StopSet, token_id: int, logprob: float, n: int, max_new_tokens: int,
                top_logprobs: tuple[tuple[int, float], ...] = ()) -> GenerationEvent:
    """The event for the ``n``-th (0-based) generated token: its text, and its finish reason if it ends the sequence.

    A stop token ends with ``stop`` and adds no text of its own; a stop string
    completed by this token ends with ``stop`` (the text before it only); the
    ``max_new_tokens``-th token ends with ``length``.
    """
    if stops.is_stop(token_id):
        return GenerationEvent(token_id, text.flush(), logprob, STOP, top_logprobs)
    piece = text.push(token_id)
    if text.stopped:
        return GenerationEvent(token_id, piece, logprob, STOP, top_logprobs)
    if n + 1 == max_new_tokens:
        return GenerationEvent(token_id, piece + text.flush(), logprob, LENGTH, top_logprobs)
    return GenerationEvent(token_id, piece, logprob, None, top_logprobs)


def completion_text(events: Iterator[GenerationEvent], emit: Callable[[str], None] | None = None) -> tuple[str, str]:
    """Drain ``events``: (the whole text, the finish reason); ``emit`` gets each non-empty piece."""
    pieces, reason = [], None
    for ev in events:
        if ev.text:
            pieces.append(ev.text)
            if emit is not None:
                emit(ev.text)
        reason = ev.finish_reason or reason
    return "".join(pieces), reason
