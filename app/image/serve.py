"""serve(image_request) -> Served: the one place that knows the order of a request.

    look (one MGET: entry + source record + failure marker; done by the fresh-hit layer and
         │ handed on, so a request looks Redis up once)
         ├─ fresh ──► HIT
         ├─ stale and the upstream failed moments ago ──► STALE
         ├─ Redis down ──► produce without the cache ──► BYPASS
         ▼ miss (or stale: replaced, unless the upstream is down)
    Miss → claim(key) ── another request's answer ──► HIT / MISS / STALE
         │ holder (or: render in parallel)
         ▼
         produce: admission → source (kept / one fetch fleet-wide / revalidated; or a plain
                  fetch when producing without the cache) → render → stamp
         → decide(result) → Outcome → Cache.finish ──► MISS (or STALE when the upstream is down)

The miss's nouns and the one decision are in app/image/miss.py; freshness and every lifetime
in app/image/freshness.py; where the source comes from in app/image/sources.py.

One deadline, started when the request arrives (REQUEST_BUDGET), bounds every wait on this
path: the lock wait, the admission check, the fetch, the memory wait and the render (which
does not start when its estimate would end past it).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

from app.cache import Cache, CacheEntry, CacheUnavailable, LockWaitTimeout, Look
from app.errors import Busy, OutOfMemory, ProxyError
from app.fetch import Fetcher
from app.guard import URLPolicy
from app.image.admission import Admission
from app.image.freshness import FRESH, STALE, Lifetimes, stamped
from app.image.miss import BYPASS, HIT, MISS, Miss, Served, decide
from app.image.miss import STALE as STALE_ANSWER
from app.image.params import ImageRequest
from app.image.quality_meta import AUTO_QUALITY, quality_meta
from app.image.sources import UPSTREAM_DOWN, SourceProvider
from app.memory import MemoryBudget, Reservation
from app.render import Rendered, RenderOptions, render
from app.render.estimate import MISS_START, estimate
from app.settings import Settings

log = logging.getLogger("image_proxy.serve")


class ImageService:
    def __init__(
        self, settings: Settings, cache: Cache, fetcher: Fetcher, memory: MemoryBudget,
        *, recycle_after: int = 0, recycle: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.memory = memory
        self.lifetimes = Lifetimes.from_settings(settings)
        self.sources = SourceProvider(settings, cache, fetcher, self.lifetimes)
        self.admission = Admission(
            max_in_flight=settings.miss_places, render_slots=settings.render_slots,
            recycle_after=recycle_after, recycle=recycle,
        )

    def cache_look(self, request: ImageRequest) -> Look | None:
        """The request's one Redis look; None when Redis is unavailable (then serve()
        produces without the cache)."""
        try:
            return self.cache.look(request.cache_key())
        except CacheUnavailable:
            return None

    def fresh_hit(self, look: Look | None) -> Served | None:
        """The answer when the look found a fresh image (the fresh-hit layer's question)."""
        if look is None or look.entry is None or not look.entry.ok:
            return None
        if self.lifetimes.state_of(look, time.time()) != FRESH:
            return None
        return Served(look.entry, HIT)

    def serve(self, request: ImageRequest, url_policy: URLPolicy,
              looked: tuple[Look | None] | None = None) -> Served:
        """`looked`: the look the fresh-hit layer already made for this request, if any."""
        miss = Miss.begin(request, url_policy, self.settings.request_budget)
        look = self.cache_look(request) if looked is None else looked[0]
        if look is None:
            return self._produce(miss, cached=False).answer()
        state = self.lifetimes.state_of(look, time.time())
        if state == FRESH:
            return Served(look.entry, HIT)  # type: ignore[arg-type]
        if state is not None:
            miss.stale, miss.stale_raw = look.entry, look.raw
            if state == STALE:
                miss.fallback = look.entry
                if look.failing:
                    return self._stale(miss, "the upstream failed moments ago")
        try:
            with self.cache.claim(miss.key, miss.deadline, stale=miss.stale_raw) as claim:
                if claim.entry is not None:
                    return miss.waited(claim).answer()
                served = self._produce(miss, cached=True)
                if claim.holder:
                    outcome = decide(served, miss, self.lifetimes, self.settings.max_cache_entry_bytes, time.time())
                    self.cache.finish(miss.key, claim, outcome)
                return served.answer()
        except LockWaitTimeout:
            if miss.fallback is not None:
                return self._stale(miss, "another request is still revalidating it")
            raise Busy("another request for this image is still rendering; retry shortly", retry_after=2) from None
        except CacheUnavailable:
            return self._produce(miss, cached=False).answer()

    def _stale(self, miss: Miss, reason: str) -> Served:
        assert miss.fallback is not None
        log.warning("serving a stale entry (X-Cache: STALE): %s", reason)
        return Served(miss.fallback, STALE_ANSWER, timings=miss.timings)

    def _produce(self, miss: Miss, *, cached: bool) -> Served:
        """Fetch and render under admission control; without the cache (`cached=False`,
        X-Cache: BYPASS) the source is a plain fetch. A ProxyError becomes an error entry in
        the Served; an upstream that is down with a stale entry in its window gives STALE."""
        status = MISS if cached else BYPASS
        try:
            try:
                with self.admission.miss(miss.deadline):
                    entry, status = self._render_current(miss, status, cached)
            except MemoryError:
                # Anywhere on this path (the body join, an encoder buffer): the machine's
                # state, not the image's fault, so a 503 that is never stored.
                raise OutOfMemory("not enough memory for this image right now; retry shortly", retry_after=5) from None
        except ProxyError as exc:
            # The stale entry beats an answer that says nothing about the image: the upstream
            # is down, or this request's own budget or memory ran out.
            if miss.fallback is not None and (exc.kind in UPSTREAM_DOWN or not exc.cacheable):
                return self._stale(miss, f"revalidation failed: {exc.message}")
            return Served(CacheEntry.from_error(exc), status, timings=miss.timings, error=exc)
        return Served(entry, status, timings=miss.timings)

    def _render_current(self, miss: Miss, status: str, cached: bool) -> tuple[CacheEntry, str]:
        """The entry to answer with and its X-Cache: a render of the current source, or the
        stale entry renewed (HIT) when the upstream says it has not changed."""
        # Memory first, then CPU, in one reservation per miss (docs/memory.md). It starts at
        # MISS_START, a small miss's whole need (body and render), so most small misses never
        # grow; it grows past that only as the body arrives (or is read back from the kept
        # copy) and then to body + the render's estimated peak before the render takes a slot.
        floor = MISS_START[miss.request.format]
        with self.memory.reserve(floor, miss.deadline) as held:

            def hold(total: int) -> None:
                held.grow_to(max(floor, total), miss.deadline)

            current = self.sources.current(miss, hold, cached=cached)
            if current.body is None:
                assert miss.stale is not None
                return stamped(miss.stale, current.record), HIT
            # The join is done: from here on the body is held once.
            held.grow_to(max(floor, len(current.body)), miss.deadline)
            held.shrink_to(max(floor, len(current.body)))
            entry = self._render(miss, current.body, held)
        return stamped(entry, current.record), status

    def _render(self, miss: Miss, body: bytes, held: Reservation) -> CacheEntry:
        request, timings = miss.request, miss.timings
        options = RenderOptions(
            width=request.width,
            quality=request.quality,
            format=request.format,
            max_pixels=self.settings.max_source_pixels,
            max_frames=self.settings.max_animation_frames,
            input_formats=self.settings.input_formats,
            # A q=auto re-render of a variant starts its search at what it chose last time
            # (one encode when that is still right); other variants' choices do not help
            # (BENCHMARKS.md, q=auto).
            quality_hint=_last_choice(miss),
        )

        def timed_render() -> Rendered:
            started = time.monotonic()  # on the render thread: slot waiting is not render time
            try:
                return render(body, options)
            finally:
                timings.render_s = time.monotonic() - started

        cost = estimate(body, options)
        timings.memory_estimate = cost.peak_bytes
        # Never-fits is a 400 at once (inside grow); a render whose estimated time would end
        # past the deadline never starts (admission.render).
        held.grow_to(len(body) + cost.peak_bytes, miss.deadline - self.admission.estimate_seconds(cost.work_units))
        rendered = self.admission.render(timed_render, miss.deadline, cost.work_units)
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
                "source_bytes": len(body),
                "source_width": rendered.source_width,
                "source_height": rendered.source_height,
                **quality_meta(rendered),
            },
        )


def _last_choice(miss: Miss) -> int | None:
    chosen = miss.stale.meta.get(AUTO_QUALITY) if miss.stale is not None else None
    return chosen if isinstance(chosen, int) and 1 <= chosen <= 100 else None
