"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own.

    gptlab_requests_total{route, status}    HTTP requests answered
    gptlab_prompt_tokens_total              prompt tokens submitted to the engine
    gptlab_generation_tokens_total          tokens generated
    gptlab_generation_tokens_per_second     generated tokens/s over the last 10 s
    gptlab_queue_depth                      sequences waiting for a slot
    gptlab_busy_slots                       sequences running (slots in use)
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

WINDOW_S = 10.0  # tokens/s is measured over this many seconds


class Metrics:
    """The counters and gauges of one server; the worker calls :meth:`observe_step` after each step."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gptlab_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("gptlab_prompt_tokens", "prompt tokens submitted to the engine", registry=r)
        self.generation_tokens = Counter("gptlab_generation_tokens", "tokens generated", registry=r)
        self.tokens_per_second = Gauge("gptlab_generation_tokens_per_second",
                                       f"generated tokens per second over the last {WINDOW_S:g} s", registry=r)
        self.queue_depth = Gauge("gptlab_queue_depth", "sequences waiting for a slot", registry=r)
        self.busy_slots = Gauge("gptlab_busy_slots", "sequences running (slots in use)", registry=r)
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def observe_step(self, generated: int, waiting: int, running: int) -> None:
        """Record one engine step: tokens it generated, sequences waiting and running after it."""
        now = time.monotonic()
        with self._lock:
            self.generation_tokens.inc(generated)
            self._recent.append((now, generated))
            self._update_rate(now)
        self.queue_depth.set(waiting)
        self.busy_slots.set(running)

    def _update_rate(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - WINDOW_S:
            self._recent.popleft()
        self.tokens_per_second.set(sum(n for _, n in self._recent) / WINDOW_S)

    def render(self) -> bytes:
        """The text exposition format of every metric."""
        with self._lock:
            self._update_rate(time.monotonic())
        return generate_latest(self.registry)
