"""Admission control for one worker: which misses to take, and when each may render.

Capacity is counted in time, not in places. Each render is estimated before it starts:
its work (app/render/estimate.py: work units from the header, roughly one unit per second of
one idle core, growing with the source's and the output's pixels and with the format) times
the seconds a unit takes on this worker now (learned, see below).

- **A miss** is admitted when a render slot is free now, or when the renders queued ahead
  of it in this worker (the sum of their own estimates, what is left of the running ones,
  over `render_slots`) leave time for a typical render within its deadline. So a miss with
  nothing queued ahead of it is always admitted, whatever the renders before it cost: an
  idle worker cannot lock itself out. The rest is shed at once, 503 + Retry-After, before it
  costs a fetch. A cold page of 64 thumbnails is served whole, a flood that could not finish
  is refused early.
- **A render** (`render(work, deadline, units)`) whose estimate would end past its deadline
  does not start: Busy (503 + Retry-After) at once, without calling `work`. Otherwise it waits
  for a slot only until `deadline - estimate`.

Learning: after each render the worker's seconds per unit move toward what that render
took (a moving average, each render weighted by its size, so a thumbnail's noise moves it
little). Between renders the learned value decays toward INITIAL_S_PER_UNIT with a half-life
of HALF_LIFE_S: a burst of slow renders (a loaded VM) raises estimates for a minute or two,
not until the next render that happens to be admitted. The rate is one per worker, not per
format: the formats' different costs per pixel are in the work units, and what changes at
run time (other load on the cores) slows every format alike.

Cache hits never pass through here, and neither do dedup waiters (they wait for another
request's render and cost nothing to render). A miss that fetches or renders holds one of
`max_in_flight` places, which is THREADS minus the threads kept for hits, so hits always
find a thread however slow the upstreams are.

Renders run on `render_slots` dedicated threads at a lower CPU priority (nice +10): when
both cores are busy rendering, the kernel still gives a thread answering a hit the CPU at
once, so a hit's latency does not grow with the render load. A worker recycles itself after
`recycle_after` renders.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from app.errors import Busy

T = TypeVar("T")
RENDER_NICENESS = 10
#: Seconds a work unit is assumed to take before any render is measured, and what the learned
#: value decays back to: a unit is a second of one idle core, and the default settings run
#: two workers x two render slots on two cores, so a render shares its core.
INITIAL_S_PER_UNIT = 1.5
#: How fast the learned rate forgets: after a minute without renders, a rate learned under
#: load is back within a quarter of the way from the initial value.
HALF_LIFE_S = 30.0
#: Weight in the moving average of a render of TYPICAL_UNITS or more; smaller renders weigh
#: in proportion (their time is mostly fixed costs and noise).
EWMA_WEIGHT = 0.2
#: The work of a typical miss (a w=640 render of a 12 MP JPEG is about 0.15 units), assumed
#: for a miss before its header is read and for a render given no units.
TYPICAL_UNITS = 0.25
#: A measured render may move the rate at most this factor away from the initial value (a
#: stalled VM, a tiny render with a GC pause): decay brings it back either way.
RATE_BOUND = 20.0


def _lower_priority() -> None:
    # On Linux a thread has its own nice value; PRIO_PROCESS with a thread id sets just it.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), RENDER_NICENESS)


@dataclass
class _Queued:
    estimate_s: float
    started: float | None = None  # when it got a slot


class Admission:
    def __init__(
        self, *, max_in_flight: int, render_slots: int, recycle_after: int = 0,
        recycle: Callable[[], None] | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.render_slots = render_slots
        # Native decoders and encoders can leak slowly; hits cannot. So a worker is recycled
        # after `recycle_after` renders (0: never), not after a request count that a hit
        # flood would reach every few seconds.
        self.recycle_after = recycle_after
        self._recycle = recycle
        self._clock = clock  # the clock deadlines are on (time.monotonic); tests pass their own
        self._renders = 0
        self._in_flight = 0
        self._queue: dict[int, _Queued] = {}  # renders waiting for a slot or running
        self._ids = itertools.count()
        self._learned = INITIAL_S_PER_UNIT
        self._learned_at = clock()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(render_slots)
        self._renderers = ThreadPoolExecutor(render_slots, thread_name_prefix="render", initializer=_lower_priority)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        """Renders waiting for a slot or running."""
        return len(self._queue)

    @property
    def seconds_per_unit(self) -> float:
        """What a work unit takes on this worker now: the learned value, decayed toward
        INITIAL_S_PER_UNIT with the time since it was learned."""
        age = max(0.0, self._clock() - self._learned_at)
        return INITIAL_S_PER_UNIT + (self._learned - INITIAL_S_PER_UNIT) * 0.5 ** (age / HALF_LIFE_S)

    @property
    def render_seconds(self) -> float:
        """The estimated time of a typical render (TYPICAL_UNITS) on this worker now."""
        return self.estimate_seconds(TYPICAL_UNITS)

    def estimate_seconds(self, units: float) -> float:
        """How long a render of `units` work units would take on this worker now."""
        return self.seconds_per_unit * units

    def queued_seconds(self) -> float:
        """The estimated render time still ahead of the renders queued now (waiting or running)."""
        with self._lock:
            return self._queued_seconds(self._clock())

    def _queued_seconds(self, now: float) -> float:
        return sum(
            item.estimate_s if item.started is None else max(0.0, item.estimate_s - (now - item.started))
            for item in self._queue.values()
        )

    def drain_seconds(self, extra: int = 0) -> float:
        """How long until the renders queued now, plus `extra` typical ones, would all be done."""
        with self._lock:
            ahead = self._queued_seconds(self._clock())
        return (ahead + extra * self.render_seconds) / self.render_slots

    @contextmanager
    def miss(self, deadline: float) -> Iterator[None]:
        """Hold a miss place while fetching and rendering; shed at once what cannot finish."""
        with self._lock:
            if self._in_flight >= self.max_in_flight:
                raise Busy("too many images are being fetched or rendered right now; retry shortly",
                           retry_after=1)
            now = self._clock()
            if len(self._queue) >= self.render_slots:  # no slot free now: will the queue drain in time?
                ahead = self._queued_seconds(now) / self.render_slots
                if now + ahead + self.render_seconds > deadline:
                    raise Busy("the render queue would not finish this image in time; retry shortly",
                               retry_after=_retry_after(ahead))
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def render(self, work: Callable[[], T], deadline: float, units: float | None = None) -> T:
        """Run `work` (a render of `units` work units; TYPICAL_UNITS if not given) on a render
        thread once a slot is free, if its estimate still ends before `deadline`
        (time.monotonic); Busy (503) otherwise, without calling `work`."""
        units = TYPICAL_UNITS if units is None else max(0.0, units)
        with self._lock:
            now = self._clock()
            estimate = self.estimate_seconds(units)
            if now + estimate > deadline:
                raise Busy(
                    f"this image would take about {estimate:.0f} s to render, more than the "
                    f"{max(0.0, deadline - now):.0f} s left of its request budget; retry shortly",
                    retry_after=_retry_after(self._queued_seconds(now) / self.render_slots),
                )
            ticket = next(self._ids)
            self._queue[ticket] = item = _Queued(estimate)
        try:
            # Wait for a slot only as long as leaves time for the render itself.
            timeout = deadline - estimate - self._clock()
            if timeout <= 0 or not self._slots.acquire(timeout=timeout):
                raise Busy("too many images are being rendered right now; retry shortly",
                           retry_after=_retry_after(self.drain_seconds()))
            try:
                with self._lock:
                    item.started = self._clock()
                # The semaphore guarantees a free render thread, so this never queues.
                return self._renderers.submit(self._timed, work, units).result()
            finally:
                self._slots.release()
        finally:
            with self._lock:
                del self._queue[ticket]

    def _timed(self, work: Callable[[], T], units: float) -> T:
        started = self._clock()
        try:
            return work()
        finally:
            self._learn(self._clock() - started, units)

    def _learn(self, elapsed: float, units: float) -> None:
        with self._lock:
            if units > 0:
                observed = min(max(elapsed / units, INITIAL_S_PER_UNIT / RATE_BOUND), INITIAL_S_PER_UNIT * RATE_BOUND)
                current = self.seconds_per_unit
                weight = EWMA_WEIGHT * min(1.0, units / TYPICAL_UNITS)
                self._learned = current + weight * (observed - current)
                self._learned_at = self._clock()
            self._renders += 1
            due = self.recycle_after and self._renders == self.recycle_after
        if due and self._recycle is not None:
            self._recycle()


def _retry_after(seconds: float) -> int:
    return max(1, min(30, round(seconds)))
