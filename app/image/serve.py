"""serve(image_request) -> Served: the one place that knows the order of a request.

    cache.look (entry + source record + failure marker, one round trip)
        ├─ fresh ──► HIT
        ├─ stale and the upstream failed moments ago ──► STALE
        │ miss, or stale (then replaced, not answered, unless the upstream fails)
        ▼
    cache.claim(key) ──another request's result (stored or handed off)──► done
        │ holder (or: the holder's output was too large to share, render in parallel)
        ▼
    admission → current source (app/image/sources.py: kept / one fetch fleet-wide /
                revalidated) → render, or renew the stale entry (a 304: HIT, no render)
              → cache.finish (store / hand off / pass) → done
    upstream down (5xx, refused, timeout) with a stale entry ──► STALE, handed to the waiters

Freshness rules (fresh, stale, expired; per source) live in app/image/freshness.py.

One deadline, started when the request arrives (REQUEST_BUDGET), bounds every wait on
this path: the lock wait, the admission check, the fetch and the wait for a render slot.

No Flask here, so dedup and failure sharing are testable without a server. Failures the
client or upstream caused are stored as entries too (for ERROR_TTL), so waiters and
followers get the same answer without another fetch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from app.cache import Cache, CacheEntry, CacheKey, CacheUnavailable, LockWaitTimeout, Look
from app.errors import Busy, OutOfMemory, ProxyError
from app.fetch import Fetcher
from app.guard import URLPolicy
from app.image import freshness
from app.image.admission import Admission
from app.image.freshness import SourceRecord, stamped
from app.image.params import ImageRequest
from app.image.sources import UPSTREAM_DOWN, SourceProvider
from app.memory import MemoryBudget
from app.render import Rendered, RenderOptions, render
from app.render.estimate import estimate_peak
from app.settings import Settings

log = logging.getLogger("image_proxy.serve")

HIT, MISS, BYPASS, STALE = "HIT", "MISS", "BYPASS", "STALE"
#: Marks the copy of a stale entry handed to the waiters of a failed revalidation.
_SERVED_STALE = "served_stale"


@dataclass
class Timings:
    upstream_s: float = 0.0
    render_s: float = 0.0
    wait_s: float = 0.0
    source_bytes: int = 0
    memory_estimate: int = 0  # the render's estimated peak, admitted into the memory budget


@dataclass(frozen=True)
class Served:
    entry: CacheEntry
    cache_status: str  # HIT, MISS, BYPASS or STALE
    waited: bool = False  # another request rendered it while this one waited
    timings: Timings = field(default_factory=Timings)
    #: The failure behind an error entry that must not be cached (a 503, a loop): answered
    #: by raising it once the waiters have been handed the same answer.
    error: ProxyError | None = None

    @property
    def cacheable(self) -> bool:
        return self.error is None


class ImageService:
    def __init__(
        self, settings: Settings, cache: Cache, fetcher: Fetcher, kept: Cache | None, memory: MemoryBudget,
        *, recycle_after: int = 0, recycle: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.fetcher = fetcher
        self.memory = memory
        self.sources = SourceProvider(settings, cache, kept or cache, fetcher)
        self.admission = Admission(
            max_in_flight=settings.miss_places, render_slots=settings.render_slots,
            recycle_after=recycle_after, recycle=recycle,
        )

    def serve(self, request: ImageRequest, url_policy: URLPolicy) -> Served:
        started = time.monotonic()
        deadline = started + self.settings.request_budget
        key = request.cache_key()
        try:
            look = self.cache.look(key)
        except CacheUnavailable:
            return self._produce(request, url_policy, BYPASS, deadline)
        stale = fallback = None
        if look.entry is not None:
            state = self._state(look)
            if state == freshness.FRESH:
                return Served(look.entry, HIT)
            if state == freshness.STALE:
                if look.failing:
                    return self._stale(look.entry, "the upstream failed moments ago")
                fallback = look.entry
            stale = look.entry  # out of date: replaced by what the revalidation brings
        try:
            with self.cache.claim(key, deadline, stale=stale) as claim:
                if claim.entry is not None:
                    timings = Timings(wait_s=time.monotonic() - started)
                    if claim.entry.meta.get(_SERVED_STALE):
                        return Served(claim.entry, STALE, waited=True, timings=timings)
                    status = MISS if claim.handed_off else HIT
                    return Served(claim.entry, status, waited=True, timings=timings)
                served = self._produce(request, url_policy, MISS, deadline, raise_uncacheable=False, key=key,
                                       stale=stale, fallback=fallback)
                if claim.holder:
                    if served.cache_status == STALE:
                        # Hand the stale entry to this moment's waiters; store nothing, so a
                        # failed revalidation never extends the stale window.
                        claim.share = True
                        marked = dataclasses.replace(served.entry, meta={**served.entry.meta, _SERVED_STALE: True})
                        self.cache.finish(key, claim, marked, cacheable=False)
                    else:
                        self.cache.finish(key, claim, served.entry, cacheable=served.cacheable,
                                          replaces=look.raw if stale is not None else None,
                                          ttl=self._entry_ttl(served.entry))
                if not served.cacheable:
                    raise served.error  # type: ignore[misc]
                return served
        except LockWaitTimeout:
            raise Busy("another request for this image is still rendering; retry shortly", retry_after=2) from None
        except CacheUnavailable:
            return self._produce(request, url_policy, BYPASS, deadline)

    def fresh_hit(self, request: ImageRequest) -> Served | None:
        """The answer when the entry is in the cache and fresh (one Redis round trip), else
        None: everything else (miss, stale, Redis down) is serve()'s. Raises
        CacheUnavailable."""
        look = self.cache.look(request.cache_key())
        if look.entry is not None and self._state(look) == freshness.FRESH:
            return Served(look.entry, HIT)
        return None

    def _state(self, look: Look) -> str:
        assert look.entry is not None
        return freshness.state(look.entry, SourceRecord.from_bytes(look.record), time.time(), self.settings.stale_ttl)

    def _stale(self, entry: CacheEntry, reason: str, timings: Timings | None = None) -> Served:
        log.warning("serving a stale entry (X-Cache: STALE): %s", reason)
        return Served(entry, STALE, timings=timings or Timings())

    def _entry_ttl(self, entry: CacheEntry) -> int | None:
        """An image lives until its stale window ends: its stamp plus STALE_TTL."""
        fresh_until = entry.meta.get("fresh_until") if entry.ok else None
        if not isinstance(fresh_until, (int, float)):
            return None
        return max(1, int(fresh_until + self.settings.stale_ttl - time.time()) + 1)

    def _produce(
        self, request: ImageRequest, url_policy: URLPolicy, status: str, deadline: float,
        *, raise_uncacheable: bool = True, key: CacheKey | None = None, stale: CacheEntry | None = None,
        fallback: CacheEntry | None = None,
    ) -> Served:
        """Fetch and render under admission control. A ProxyError becomes an error entry
        (to store for ERROR_TTL or hand to the waiters); one that must not be cached is
        raised, or returned with `cacheable=False` for a lock holder to hand over first.
        With a `fallback` (a stale entry still inside its window), an upstream that is down
        gives that entry as STALE instead of the error."""
        timings = Timings()
        try:
            try:
                with self.admission.miss(deadline):
                    entry, status = self._render_current(request, url_policy, timings, deadline, status, key, stale)
            except MemoryError:
                # Anywhere on this path (the body join, an encoder buffer): the machine's
                # state, not the image's fault, so a 503 that is never stored.
                raise OutOfMemory("not enough memory for this image right now; retry shortly", retry_after=5) from None
        except ProxyError as exc:
            if fallback is not None and exc.kind in UPSTREAM_DOWN:
                return self._stale(fallback, f"revalidation failed: {exc.message}", timings)
            if not exc.cacheable and raise_uncacheable:
                raise
            return Served(error_entry(exc), status, timings=timings, error=None if exc.cacheable else exc)
        return Served(entry, status, timings=timings)

    def _render_current(
        self, request: ImageRequest, url_policy: URLPolicy, timings: Timings, deadline: float, status: str,
        key: CacheKey | None, stale: CacheEntry | None,
    ) -> tuple[CacheEntry, str]:
        """The entry to answer with and its X-Cache: a render of the current source, or the
        stale entry renewed (HIT) when the upstream says it has not changed."""
        # Memory first, then CPU: the source body is admitted into the service's memory
        # budget as it arrives (or as it is read back from the kept copy), the render by its
        # estimated peak before it takes a render slot (_render_body). What does not fit
        # waits within the request budget (then 503); what never could is a 400.
        with self.memory.reserve(0, deadline) as body_held:

            def hold(total: int) -> None:
                body_held.grow(total - body_held.nbytes, deadline)

            record: SourceRecord | None = None
            body: bytes | None = None
            if key is not None:
                try:
                    current = self.sources.current(key, request.url, url_policy, deadline, stale, hold_bytes=hold)
                except CacheUnavailable:
                    current = None
                if current is not None:
                    record, body = current.record, current.body
                    if current.fetched is not None:
                        timings.upstream_s = current.fetched.fetch_seconds
                        timings.source_bytes = len(current.fetched.body)
                    if body is None:
                        assert stale is not None
                        return stamped(stale, record), HIT
            if body is None:
                source = self.fetcher.fetch_source(request.url, url_policy, deadline=deadline, hold_bytes=hold)
                timings.upstream_s = source.fetch_seconds
                timings.source_bytes = len(source.body)
                body = source.body
            # The join is done: from here on the body is held once.
            hold(max(body_held.nbytes, len(body)))
            body_held.shrink_to(len(body))
            entry = self._render_body(request, body, timings, deadline, body_held.nbytes)
        # Without a record (Redis failed mid-way), the render vouches for itself until CACHE_TTL.
        record = record or SourceRecord(freshness.digest_of(body), time.time() + self.settings.cache_ttl)
        return stamped(entry, record), status

    def _render_body(
        self, request: ImageRequest, body: bytes, timings: Timings, deadline: float, body_bytes: int = 0
    ) -> CacheEntry:
        source_body = body
        options = RenderOptions(
            width=request.width,
            quality=request.quality,
            format=request.format,
            max_pixels=self.settings.max_source_pixels,
            max_frames=self.settings.max_animation_frames,
            input_formats=self.settings.input_formats,
        )

        def timed_render() -> Rendered:
            started = time.monotonic()  # on the render thread: slot waiting is not render time
            try:
                return render(source_body, options)
            finally:
                timings.render_s = time.monotonic() - started

        timings.memory_estimate = estimate_peak(source_body, options)
        if timings.memory_estimate + body_bytes > self.memory.limit:
            # It could never fit beside its own body: a 400 now, not a wait that blocks the queue.
            raise self.memory.never_fits(timings.memory_estimate + body_bytes)
        memory_deadline = deadline - self.admission.render_seconds
        with self.memory.reserve(timings.memory_estimate, memory_deadline):
            rendered = self.admission.render(timed_render, deadline)
        return CacheEntry(
            status=200,
            body=rendered.body,
            content_type=rendered.content_type,
            etag=f'"{hashlib.blake2b(rendered.body, digest_size=16).hexdigest()}"',
            meta={
                "width": rendered.width,
                "height": rendered.height,
                "frames": rendered.frames,
                "source_format": rendered.source_format,
                "source_bytes": len(source_body),
                "source_width": rendered.source_width,
                "source_height": rendered.source_height,
            },
        )


def error_entry(exc: ProxyError) -> CacheEntry:
    return CacheEntry(
        status=exc.status,
        body=b"",
        content_type="application/json",
        error=exc.message,
        kind=exc.kind,
        retry_after=exc.retry_after,
    )
