"""serve(image_request) -> Served: the one place that knows the order of a request.

    cache.get ──hit──► done
        │ miss
        ▼
    render_lock(key) ──entry appeared while waiting──► done
        │ holder
        ▼
    fetch → render → cache.put → done

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
from app.errors import Busy, ProxyError
from app.fetch import Fetcher
from app.guard import URLPolicy
from app.image.admission import Admission
from app.image.params import ImageRequest
from app.render import Rendered, RenderOptions, render
from app.settings import Settings

log = logging.getLogger("image_proxy.serve")

HIT, MISS, BYPASS = "HIT", "MISS", "BYPASS"


@dataclass
class Timings:
    upstream_s: float = 0.0
    render_s: float = 0.0
    wait_s: float = 0.0
    source_bytes: int = 0


@dataclass(frozen=True)
class Served:
    entry: CacheEntry
    cache_status: str  # HIT, MISS or BYPASS
    waited: bool = False  # another request rendered it while this one waited
    timings: Timings = field(default_factory=Timings)


class ImageService:
    def __init__(self, settings: Settings, cache: Cache, fetcher: Fetcher) -> None:
        self.settings = settings
        self.cache = cache
        self.fetcher = fetcher
        self.admission = Admission(
            max_in_flight=settings.max_queue, render_slots=settings.render_slots, queue_timeout=settings.queue_timeout
        )

    def serve(self, request: ImageRequest, url_policy: URLPolicy) -> Served:
        key = request.cache_key()
        try:
            entry = self.cache.get(key)
        except CacheUnavailable:
            with self.admission.miss():
                return self._produce(request, url_policy, BYPASS)
        if entry is not None:
            return Served(entry, HIT)
        with self.admission.miss():
            return self._serve_miss(request, url_policy, key)

    def _serve_miss(self, request: ImageRequest, url_policy: URLPolicy, key: str) -> Served:
        started = time.monotonic()
        deadline = started + self.settings.request_budget
        try:
            with self.cache.render_lock(key, deadline) as stored:
                if stored is not None:
                    return Served(stored, HIT, waited=True, timings=Timings(wait_s=time.monotonic() - started))
                served = self._produce(request, url_policy, MISS)
                self.cache.put(key, served.entry)
                return served
        except LockWaitTimeout:
            raise Busy("another request for this image is still rendering; retry shortly", retry_after=2) from None
        except CacheUnavailable:
            return self._produce(request, url_policy, BYPASS)

    def _produce(self, request: ImageRequest, url_policy: URLPolicy, status: str) -> Served:
        timings = Timings()
        try:
            entry = self._render_source(request, url_policy, timings)
        except ProxyError as exc:
            if not exc.cacheable:
                raise
            entry = error_entry(exc)
        return Served(entry, status, timings=timings)

    def _render_source(self, request: ImageRequest, url_policy: URLPolicy, timings: Timings) -> CacheEntry:
        source = self.fetcher.fetch_source(request.url, url_policy)
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
        def timed_render() -> Rendered:
            started = time.monotonic()  # on the render thread: slot waiting is not render time
            try:
                return render(source.body, options)
            finally:
                timings.render_s = time.monotonic() - started

        rendered = self.admission.render(timed_render)
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
