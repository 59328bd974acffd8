"""The two nouns of a miss: what it carries (`Miss`) and how its claim ends (`decide` → `Outcome`).

A `Miss` is made once, when a request finds no fresh entry: the request, its key, its one
deadline (REQUEST_BUDGET from arrival), the out-of-date entry it found (to replace, or to
serve if the upstream is down) and its timings. It flows one way: claim → source → render →
`decide` → `Cache.finish`.

`decide` is the only place that says what a holder's result means for the others:

    the stale entry, because the upstream is down ─► SHARE (this moment's waiters; never stored,
                                                     so a failed revalidation never extends it)
    a failure of the holder's own (budget, memory) ─► RELEASE (the next waiter tries itself)
    an image too large to store                   ─► PASS (the waiters render in parallel)
    an image                                      ─► STORE until its stale window ends
    a failure about the image or the upstream     ─► STORE for ERROR_TTL, or SHARE when it is 0
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from app.cache import PASS, RELEASE, SHARE, STORE, CacheEntry, CacheKey, Claim, Outcome
from app.errors import ProxyError
from app.guard import URLPolicy
from app.image.freshness import Lifetimes
from app.image.params import ImageRequest

HIT, MISS, BYPASS, STALE = "HIT", "MISS", "BYPASS", "STALE"
#: Marks the copy of a stale entry handed to the waiters of a failed revalidation.
SERVED_STALE = "served_stale"


@dataclass
class Timings:
    upstream_s: float = 0.0
    render_s: float = 0.0
    wait_s: float = 0.0
    source_bytes: int = 0
    memory_estimate: int = 0  # the render's estimated peak, admitted into the memory budget


@dataclass
class Miss:
    request: ImageRequest
    url_policy: URLPolicy
    key: CacheKey
    started: float  # time.monotonic() at arrival
    deadline: float  # the one deadline of every wait on the miss path
    #: The entry found out of date (raw bytes, as stored): replaced by this miss's result.
    stale_raw: bytes | None = None
    stale: CacheEntry | None = None
    #: The stale entry still inside its window: answered (STALE) if the upstream is down.
    fallback: CacheEntry | None = None
    timings: Timings = field(default_factory=Timings)

    @classmethod
    def begin(cls, request: ImageRequest, url_policy: URLPolicy, budget: float) -> Miss:
        started = time.monotonic()
        return cls(request, url_policy, request.cache_key(), started, started + budget)

    def waited(self, claim: Claim) -> Served:
        """The answer another request's claim left for this one."""
        assert claim.entry is not None
        timings = Timings(wait_s=time.monotonic() - self.started)
        if claim.entry.meta.get(SERVED_STALE):
            return Served(claim.entry, STALE, waited=True, timings=timings)
        return Served(claim.entry, MISS if claim.handed_off else HIT, waited=True, timings=timings)


@dataclass(frozen=True)
class Served:
    entry: CacheEntry
    cache_status: str  # HIT, MISS, BYPASS or STALE
    waited: bool = False  # another request rendered it while this one waited
    timings: Timings = field(default_factory=Timings)
    #: The failure behind an error entry (None for an image).
    error: ProxyError | None = None

    def answer(self) -> Served:
        """This, for the client: a failure of the request's own (a 503) is raised, so the
        one error handler answers it; a failure about the image is an entry like an image."""
        if self.error is not None and not self.error.cacheable:
            raise self.error
        return self


def decide(served: Served, miss: Miss, lifetimes: Lifetimes, max_entry_bytes: int, now: float) -> Outcome:
    entry = served.entry
    if served.cache_status == STALE:
        return Outcome(SHARE, dataclasses.replace(entry, meta={**entry.meta, SERVED_STALE: True}))
    if served.error is not None and not served.error.cacheable:
        return Outcome(RELEASE)
    if entry.ok and len(entry.body) > max_entry_bytes:
        return Outcome(PASS)
    ttl_ms = lifetimes.entry_ttl_ms(entry, now)
    if ttl_ms <= 0:
        return Outcome(SHARE, entry)
    return Outcome(STORE, entry, ttl_ms, replaces=miss.stale_raw)
