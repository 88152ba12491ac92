"""The one worker thread that owns the engine; HTTP handlers reach it only through commands.

    worker = Worker(engine, max_queue=64, metrics=metrics); worker.start()
    gen = Generation(worker, [Request(...), ...])    # in an async handler: reserves, submits
    async for index, event in gen.events(): ...      # GenerationEvents, one stream per request
    gen.close()                                      # cancels what is still running (disconnect)

The engine is not thread-safe, so only the worker thread touches it. Handlers
put commands (submit, cancel, call) on a thread-safe queue; the worker runs
them between two :meth:`Engine.step` calls and hands each event to its
request's sink, which moves it onto the handler's asyncio loop with
``loop.call_soon_threadsafe``. A cancel therefore takes effect before the next
decode step: the slot is free within one step.

Capacity: ``max_batch`` running plus ``max_queue`` waiting sequences. A
request that would exceed it is refused at once (:class:`Overloaded`; the
HTTP layer answers 429 with ``Retry-After``), never queued without bound.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from gptlab.inference.engine import Engine, Handle, Request
from gptlab.inference.generation import GenerationEvent
from gptlab.logs import get_logger

log = get_logger(__name__)


class Overloaded(Exception):
    """No room for the request: the queue is full, or the server is shutting down (``stopping``)."""

    def __init__(self, message: str, stopping: bool = False):
        super().__init__(message)
        self.stopping = stopping


@dataclass(eq=False)
class Ticket:
    """One engine request on its way: what the worker submitted and where its events go."""

    request: Request
    sink: Callable[[GenerationEvent | BaseException], None]
    handle: Handle | None = None
    done: bool = False


class Worker:
    """Owns an :class:`Engine` on a thread of its own; steps it while anything is in flight.

    Args:
        engine: the engine (built on the model); used only from the worker thread after ``start``.
        max_queue: sequences that may wait for a slot beyond the engine's ``max_batch`` running ones.
        metrics: a :class:`~gptlab.serve.metrics.Metrics` (or None) told about every step.
    """

    def __init__(self, engine: Engine, max_queue: int = 64, metrics=None):
        self.engine, self.metrics = engine, metrics
        self.capacity = len(engine.free) + max_queue
        self.stopping = False
        self._lock = threading.Lock()
        self._in_flight = 0
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tickets: dict[int, Ticket] = {}
        self._thread = threading.Thread(target=self._run, name="gptlab-engine", daemon=True)

    # ---- called from any thread ----
    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    @property
    def in_flight(self) -> int:
        """Sequences reserved and not yet finished."""
        return self._in_flight

    def reserve(self, n: int) -> None:
        """Book ``n`` sequences of capacity, or raise :class:`Overloaded`."""
        with self._lock:
            if self.stopping:
                raise Overloaded("the server is shutting down", stopping=True)
            if self._in_flight + n > self.capacity:
                raise Overloaded(f"the server is busy: {self._in_flight} sequences in flight, room for "
                                 f"{self.capacity} (--max-batch + --max-queue); retry shortly")
            self._in_flight += n

    def release(self, n: int = 1) -> None:
        """Give back ``n`` sequences of capacity."""
        with self._lock:
            self._in_flight -= n

    def submit(self, ticket: Ticket) -> None:
        """Queue ``ticket`` for the engine (its capacity must be reserved)."""
        self._commands.put(("submit", ticket))

    def cancel(self, ticket: Ticket) -> None:
        """End ``ticket``'s sequence before the next step (nothing happens if it already finished)."""
        self._commands.put(("cancel", ticket))

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn()`` on the worker thread between two steps (it may use the model); its result as a Future."""
        fut: Future = Future()
        self._commands.put(("call", fn, fut))
        return fut

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new requests, cancel what is in flight, and end the thread."""
        with self._lock:
            self.stopping = True
        self._commands.put(("stop",))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the worker thread ----
    def _run(self) -> None:
        stop = False
        while True:
            try:
                cmd = self._commands.get(timeout=0.5) if not self.engine.busy else self._commands.get_nowait()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                stop = self._do(cmd) or stop
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if stop:
                for ticket in list(self._tickets.values()):
                    self.engine.cancel(ticket.handle)
            if self.engine.busy:
                self._step()
            elif stop:
                return

    def _do(self, cmd: tuple) -> bool:
        """Run one command; True for stop."""
        kind = cmd[0]
        if kind == "stop":
            return True
        if kind == "call":
            _, fn, fut = cmd
            try:
                fut.set_result(fn())
            except BaseException as e:  # the caller gets the error; the worker goes on
                fut.set_exception(e)
        elif kind == "submit":
            ticket = cmd[1]
            try:
                ticket.handle = self.engine.submit(ticket.request)
            except Exception as e:  # refused by the engine: tell the handler, free the capacity
                self._finish(ticket, e)
                return False
            self._tickets[ticket.handle.id] = ticket
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(len(ticket.request.prompt))
        elif kind == "cancel":
            ticket = cmd[1]
            if ticket.handle is not None and not ticket.done:
                self.engine.cancel(ticket.handle)
        return False

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:  # nothing a client sent should get here; if it does, fail the batch, not the server
            log.error("the engine step failed (%s: %s); the requests in flight are ended", type(e).__name__, e)
            for ticket in list(self._tickets.values()):
                self.engine.cancel(ticket.handle)
                self._tickets.pop(ticket.handle.id, None)
                self._finish(ticket, e)
            try:
                self.engine.step()  # hand out the cancellations (to nobody): the engine is clean again
            except Exception:
                log.error("the engine could not recover from the failed step")
            return
        generated = 0
        for handle, event in events:
            generated += event.token_id is not None
            ticket = self._tickets.get(handle.id)
            if ticket is None:
                continue
            if event.finish_reason is not None:
                del self._tickets[handle.id]
                self._finish(ticket, event)
            else:
                _send(ticket, event)
        if self.metrics is not None:
            self.metrics.observe_step(generated, len(self.engine.waiting), len(self.engine.running))

    def _finish(self, ticket: Ticket, last: GenerationEvent | BaseException) -> None:
        ticket.done = True
        self.release(1)
        _send(ticket, last)


def _send(ticket: Ticket, item) -> None:
    try:
        ticket.sink(item)
    except RuntimeError:  # the handler's event loop is closed (shutdown): nobody is listening
        pass


class Generation:
    """The engine requests of one HTTP request, read as one async stream of ``(index, event)``.

    Creating it reserves capacity (raises :class:`Overloaded`) and submits every request;
    :meth:`close` cancels those still running (call it in a ``finally``).
    """

    def __init__(self, worker: Worker, requests: list[Request]):
        worker.reserve(len(requests))
        self.worker = worker
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.tickets = [Ticket(r, self._sink(i)) for i, r in enumerate(requests)]
        self._open = len(requests)
        for ticket in self.tickets:
            worker.submit(ticket)

    def _sink(self, index: int):
        return lambda item: self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, item))

    async def events(self):
        """``(index, GenerationEvent)`` as they come, until every request has finished.

        An error the engine raised for a request is raised here.
        """
        while self._open:
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                self._open -= 1
                raise item
            if item.finish_reason is not None:
                self._open -= 1
            yield index, item

    def close(self) -> None:
        """Cancel the requests still running (their slots are free before the next step)."""
        for ticket in self.tickets:
            if not ticket.done:
                self.worker.cancel(ticket)
