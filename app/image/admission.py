"""Admission control for one worker: which misses to take, and when each may render.

Capacity is counted in time, not in places: a miss is admitted when the renders already
queued, drained at the rate this worker has measured, leave time for its own render within
the request budget; only the rest is shed, at once, with 503 + Retry-After. A cold page of
64 thumbnails is therefore served whole, while a flood that could not finish in time is
refused before it costs a fetch.

Cache hits never pass through here, and neither do dedup waiters (they wait for another
request's render and cost nothing to render). A miss that fetches or renders holds one of
`max_in_flight` places, which is THREADS minus the threads kept for hits, so hits always
find a thread however slow the upstreams are.

Renders run on `render_slots` dedicated threads at a lower CPU priority (nice +10): when
both cores are busy rendering, the kernel still gives a thread answering a hit the CPU at
once, so a hit's latency does not grow with the render load.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from app.errors import Busy

T = TypeVar("T")
RENDER_NICENESS = 10
#: Render time assumed before the first render is measured (a w=640 photo takes ~0.25 s on
#: one core): low enough that a cold worker admits a page, high enough to shed a flood.
INITIAL_RENDER_S = 0.5
#: Weight of the newest render in the moving average: recent load matters more.
EWMA_WEIGHT = 0.2


def _lower_priority() -> None:
    # On Linux a thread has its own nice value; PRIO_PROCESS with a thread id sets just it.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), RENDER_NICENESS)


class Admission:
    def __init__(
        self, *, max_in_flight: int, render_slots: int, recycle_after: int = 0,
        recycle: Callable[[], None] | None = None,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.render_slots = render_slots
        # Native decoders and encoders can leak slowly; hits cannot. So a worker is recycled
        # after `recycle_after` renders (0: never), not after a request count that a hit
        # flood would reach every few seconds.
        self.recycle_after = recycle_after
        self._recycle = recycle
        self._renders = 0
        self._in_flight = 0
        self._queued = 0  # renders waiting for a slot or running
        self._render_s = INITIAL_RENDER_S
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(render_slots)
        self._renderers = ThreadPoolExecutor(render_slots, thread_name_prefix="render", initializer=_lower_priority)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def render_seconds(self) -> float:
        """The measured mean render time (moving average) of this worker."""
        return self._render_s

    def drain_seconds(self, extra: int = 0) -> float:
        """How long until the renders queued now, plus `extra` more, would all be done."""
        queued = self._queued + extra
        rounds = -(-queued // self.render_slots)  # ceil: slots work in parallel
        return rounds * self._render_s

    @contextmanager
    def miss(self, deadline: float) -> Iterator[None]:
        """Hold a miss place while fetching and rendering; shed at once what cannot finish."""
        with self._lock:
            if self._in_flight >= self.max_in_flight:
                raise Busy("too many images are being fetched or rendered right now; retry shortly",
                           retry_after=1)
            if time.monotonic() + self.drain_seconds(extra=1) > deadline:
                raise Busy("the render queue would not finish this image in time; retry shortly",
                           retry_after=self._retry_after())
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def render(self, work: Callable[[], T], deadline: float) -> T:
        """Run `work` on a render thread once a slot is free, if it can still finish before
        `deadline` (time.monotonic); Busy (503) otherwise."""
        with self._lock:
            self._queued += 1
        try:
            # Wait for a slot only as long as leaves time for the render itself.
            timeout = deadline - time.monotonic() - self._render_s
            if timeout <= 0 or not self._slots.acquire(timeout=timeout):
                raise Busy("too many images are being rendered right now; retry shortly",
                           retry_after=self._retry_after())
            try:
                # The semaphore guarantees a free render thread, so this never queues.
                return self._renderers.submit(self._timed, work).result()
            finally:
                self._slots.release()
        finally:
            with self._lock:
                self._queued -= 1

    def _timed(self, work: Callable[[], T]) -> T:
        started = time.monotonic()
        try:
            return work()
        finally:
            elapsed = time.monotonic() - started
            with self._lock:
                self._render_s += EWMA_WEIGHT * (elapsed - self._render_s)
                self._renders += 1
                due = self.recycle_after and self._renders == self.recycle_after
            if due and self._recycle is not None:
                self._recycle()

    def _retry_after(self) -> int:
        return max(1, min(30, round(self.drain_seconds())))
