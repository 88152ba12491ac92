"""What every generating route shares: the served model of a request, starting a generation, waiting for it.

    served = ready(request)                          # 503 while the model loads
    body = await read_json(request, body_limit(request))
    gen = start(served, requests)                    # 429 when full, 503 when shutting down
    replies = await collect(request, gen, n)         # a client that leaves cancels its sequences
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from gptlab.inference.engine import Request
from gptlab.inference.generation import GenerationEvent
from gptlab.serve.http import ApiError
from gptlab.serve.worker import Generation, Overloaded


class ClientGone(Exception):
    """The client closed the connection before its reply was complete."""


def ready(request):
    """The app's :class:`~gptlab.serve.model.ServedModel`, or 503 while it is still loading."""
    served = request.app.state.served
    if served is None:
        raise ApiError(503, "the model is still loading; retry shortly", code="loading")
    return served


def body_limit(request) -> int:
    """The app's cap on request bodies, in bytes."""
    return request.app.state.max_body_bytes


def start(served, requests: list[Request]) -> Generation:
    """Reserve room for ``requests`` and submit them (429 when the queue is full, 503 when shutting down)."""
    try:
        return Generation(served.worker, requests)
    except Overloaded as e:
        raise ApiError(503 if e.stopping else 429, str(e), code="shutting_down" if e.stopping else "queue_full")


@dataclass
class Reply:
    """One choice's events gathered: its text, its token events (stop tokens left out), its finish reason."""

    request: Request
    pieces: list[str] = field(default_factory=list)
    tokens: list[GenerationEvent] = field(default_factory=list)
    generated: int = 0
    finish_reason: str | None = None
    first_ns: int | None = None  # when the first token came (perf_counter_ns)

    def add(self, event: GenerationEvent) -> None:
        """Take one event of this choice."""
        self.pieces.append(event.text)
        if event.token_id is not None:
            self.generated += 1
            self.first_ns = self.first_ns or time.perf_counter_ns()
            if shown(self.request, event):
                self.tokens.append(event)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def shown(request: Request, event: GenerationEvent) -> bool:
    """Is ``event``'s token part of the reply (a stop token is not: it has no text and no logprob entry)?"""
    return event.token_id is not None and not (request.stops is not None and request.stops.is_stop(event.token_id))


async def until_disconnect(request, coro):
    """Await ``coro``; if the client disconnects first, cancel it and raise :class:`ClientGone`."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientGone()


async def collect(request, gen: Generation, requests: list[Request]) -> list[Reply]:
    """Every choice of ``gen`` gathered into :class:`Reply` objects (cancelled if the client leaves)."""
    replies = [Reply(r) for r in requests]

    async def consume():
        async for index, event in gen.events():
            replies[index].add(event)

    try:
        await until_disconnect(request, consume())
    finally:
        gen.close()
    return replies


def token_piece(tokenizer, token_id: int) -> str:
    """The text one token stands for on its own (part of a multi-byte character reads as U+FFFD)."""
    return tokenizer.decode([token_id])
