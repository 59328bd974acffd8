"""serve(image_request) -> Served: the one place that knows the order of a request.

    cache.get ──hit──► done
        │ miss
        ▼
    cache.claim(key) ──another request's result (stored or handed off)──► done
        │ holder (or: the holder's output was too large to share, render in parallel)
        ▼
    admission → fetch → render → cache.finish (store / hand off / pass) → done

One deadline, started when the request arrives (REQUEST_BUDGET), bounds every wait on
this path: the lock wait, the admission check, the fetch and the wait for a render slot.

No Flask here, so dedup and failure sharing are testable without a server. Failures the
client or upstream caused are stored as entries too (for ERROR_TTL), so waiters and
followers get the same answer without another fetch.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

from app.cache import Cache, CacheEntry, CacheUnavailable, LockWaitTimeout
from app.errors import Busy, OutOfMemory, ProxyError
from app.fetch import Fetcher
from app.guard import URLPolicy
from app.image.admission import Admission
from app.image.params import ImageRequest
from app.memory import MemoryBudget
from app.render import Rendered, RenderOptions, render
from app.render.estimate import estimate_peak
from app.settings import Settings

log = logging.getLogger("image_proxy.serve")

HIT, MISS, BYPASS = "HIT", "MISS", "BYPASS"


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
    cache_status: str  # HIT, MISS or BYPASS
    waited: bool = False  # another request rendered it while this one waited
    timings: Timings = field(default_factory=Timings)
    #: The failure behind an error entry that must not be cached (a 503, a loop): answered
    #: by raising it once the waiters have been handed the same answer.
    error: ProxyError | None = None

    @property
    def cacheable(self) -> bool:
        return self.error is None


class ImageService:
    def __init__(self, settings: Settings, cache: Cache, fetcher: Fetcher, memory: MemoryBudget) -> None:
        self.settings = settings
        self.cache = cache
        self.fetcher = fetcher
        self.memory = memory
        self.admission = Admission(max_in_flight=settings.miss_places, render_slots=settings.render_slots)

    def serve(self, request: ImageRequest, url_policy: URLPolicy) -> Served:
        started = time.monotonic()
        deadline = started + self.settings.request_budget
        key = request.cache_key()
        try:
            entry = self.cache.get(key)
        except CacheUnavailable:
            return self._produce(request, url_policy, BYPASS, deadline)
        if entry is not None:
            return Served(entry, HIT)
        try:
            with self.cache.claim(key, deadline) as claim:
                if claim.entry is not None:
                    timings = Timings(wait_s=time.monotonic() - started)
                    status = MISS if claim.handed_off else HIT
                    return Served(claim.entry, status, waited=True, timings=timings)
                served = self._produce(request, url_policy, MISS, deadline, raise_uncacheable=False)
                if claim.holder:
                    self.cache.finish(key, claim, served.entry, cacheable=served.cacheable)
                if not served.cacheable:
                    raise served.error  # type: ignore[misc]
                return served
        except LockWaitTimeout:
            raise Busy("another request for this image is still rendering; retry shortly", retry_after=2) from None
        except CacheUnavailable:
            return self._produce(request, url_policy, BYPASS, deadline)

    def _produce(
        self, request: ImageRequest, url_policy: URLPolicy, status: str, deadline: float,
        *, raise_uncacheable: bool = True,
    ) -> Served:
        """Fetch and render under admission control. A ProxyError becomes an error entry
        (to store for ERROR_TTL or hand to the waiters); one that must not be cached is
        raised, or returned with `cacheable=False` for a lock holder to hand over first."""
        timings = Timings()
        try:
            try:
                with self.admission.miss(deadline):
                    entry = self._render_source(request, url_policy, timings, deadline)
            except MemoryError:
                # Anywhere on this path (the body join, an encoder buffer): the machine's
                # state, not the image's fault, so a 503 that is never stored.
                raise OutOfMemory("not enough memory for this image right now; retry shortly", retry_after=5) from None
        except ProxyError as exc:
            if not exc.cacheable and raise_uncacheable:
                raise
            return Served(error_entry(exc), status, timings=timings, error=None if exc.cacheable else exc)
        return Served(entry, status, timings=timings)

    def _render_source(
        self, request: ImageRequest, url_policy: URLPolicy, timings: Timings, deadline: float
    ) -> CacheEntry:
        # Memory first, then CPU: the body is admitted into the service's memory budget as it
        # arrives, the render by its estimated peak before it takes a render slot. What does
        # not fit waits within the request budget (then 503); what never could is a 400.
        with self.memory.reserve(0, deadline) as body_held:
            source = self.fetcher.fetch_source(
                request.url, url_policy, deadline=deadline,
                hold_bytes=lambda total: body_held.grow(total - body_held.nbytes, deadline),
            )
            timings.upstream_s = source.fetch_seconds
            timings.source_bytes = len(source.body)
            options = RenderOptions(
                width=request.width,
                quality=request.quality,
                format=request.format,
                max_pixels=self.settings.max_source_pixels,
                max_frames=self.settings.max_animation_frames,
                input_formats=self.settings.input_formats,
            )
            timings.memory_estimate = estimate_peak(source.body, options)

            def timed_render() -> Rendered:
                started = time.monotonic()  # on the render thread: slot waiting is not render time
                try:
                    return render(source.body, options)
                finally:
                    timings.render_s = time.monotonic() - started

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
                "source_bytes": len(source.body),
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
