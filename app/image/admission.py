"""Admission control for one worker: how many misses may be in flight, and how many render.

Cache hits never pass through here. A miss (fetching, waiting for another request's render,
waiting for a render slot, or rendering) holds one of MAX_QUEUE places for its whole life;
past that the answer is an immediate 503 with Retry-After, so the worker always keeps
THREADS - MAX_QUEUE threads free for hits, however slow the upstreams are. Only RENDER_SLOTS
renders run at once, because they are CPU-bound: past the core count each one only gets
slower. A miss that waits longer than QUEUE_TIMEOUT for a slot gets the same 503.

Renders run on RENDER_SLOTS dedicated threads at a lower CPU priority (nice +10): when both
cores are busy rendering, the kernel still gives a thread answering a hit the CPU at once,
so a hit's latency does not grow with the render load.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from app.errors import Busy

T = TypeVar("T")
RENDER_NICENESS = 10


def _lower_priority() -> None:
    # On Linux a thread has its own nice value; PRIO_PROCESS with a thread id sets just it.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), RENDER_NICENESS)


class Admission:
    def __init__(self, *, max_in_flight: int, render_slots: int, queue_timeout: float) -> None:
        self.max_in_flight = max_in_flight
        self.queue_timeout = queue_timeout
        self._in_flight = 0
        self._lock = threading.Lock()
        self._render = threading.BoundedSemaphore(render_slots)
        self._renderers = ThreadPoolExecutor(render_slots, thread_name_prefix="render", initializer=_lower_priority)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextmanager
    def miss(self) -> Iterator[None]:
        with self._lock:
            if self._in_flight >= self.max_in_flight:
                raise Busy("too many images are being fetched or rendered right now; retry shortly", retry_after=1)
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def render(self, work: Callable[[], T]) -> T:
        """Run `work` on a render thread once a slot is free; Busy after QUEUE_TIMEOUT."""
        if not self._render.acquire(timeout=self.queue_timeout):
            raise Busy("too many images are being rendered right now; retry shortly", retry_after=2)
        try:
            # The semaphore guarantees a free render thread, so this never queues.
            return self._renderers.submit(work).result()
        finally:
            self._render.release()
