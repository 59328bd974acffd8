"""The current source of a miss: kept, fetched once fleet-wide, revalidated, or a plain fetch.

`SourceProvider.current(miss, hold, cached=...)` answers a render holder's question "what do
I render from?":

    without the cache (Redis down) ─────────────────────► a plain fetch
    source record fresh ──stale entry rendered from it──► Renewed (no fetch, no render)
        │               ──kept source matches it───────► the kept body (a reuse hit)
        ▼ otherwise
    source claim (one per source URL, fleet-wide; the same claim as a variant's)
        ├─ another request fetched: its kept body / renewed record, or its failure
        └─ holder: conditional GET when there is something to renew, else a plain GET
              304 / same bytes ─► record renewed (fresh_until = now + CACHE_TTL)
              200 new bytes   ─► record replaced; the body kept SOURCE_TTL if it sniffs as a
                                 supported image and is at most SOURCE_MAX_BYTES, counted
                                 against SOURCE_CACHE_BYTES (oldest kept sources dropped)
              failure         ─► handed to the waiters of the moment when it is about the
                                 upstream or the body; 5xx / refused / timeout also set a
                                 short failure marker so stale answers skip the retry

A kept source feeds a render only while the record vouches for its digest and is fresh, so
a source past CACHE_TTL is never rendered unrevalidated.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from app import metrics
from app.cache import RELEASE, SHARE, STORE, Cache, CacheEntry, CacheUnavailable, Outcome, SourceRecord
from app.errors import ProxyError
from app.fetch import Fetcher, Source, Validators
from app.image.freshness import Lifetimes, digest_of
from app.image.miss import Miss
from app.render.sniff import supported_format
from app.settings import Settings

log = logging.getLogger("image_proxy.sources")

#: Failures that mean "the upstream is down", not "the source is gone or bad": a stale entry
#: is served for these (SPEC §10), and only these.
UPSTREAM_DOWN = frozenset({"upstream_failed", "upstream_timeout", "too_many_redirects"})
_NOT_MODIFIED = 304
#: Handed to the source claim's waiters when there is no body to keep: "the record was
#: renewed (or the body is not kept), read the record".
_RENEWED = CacheEntry(status=_NOT_MODIFIED, body=b"", content_type="")

Hold = Callable[[int], None]


@dataclass(frozen=True)
class Current:
    """The record now in force, and the body to render from (None: the stale entry is
    current again, nothing to render)."""

    record: SourceRecord
    body: bytes | None
    fetched: Source | None = None  # set when this request downloaded it


class SourceProvider:
    def __init__(self, settings: Settings, cache: Cache, fetcher: Fetcher, lifetimes: Lifetimes) -> None:
        self.settings = settings
        self.cache = cache
        self.fetcher = fetcher
        self.lifetimes = lifetimes

    def current(self, miss: Miss, hold: Hold, *, cached: bool) -> Current:
        """The current source of the miss. `hold` admits a fetched body into the memory budget."""
        if cached:
            try:
                return self._shared(miss, hold)
            except CacheUnavailable:
                pass  # Redis failed before anything was fetched: fetch without it
        source = self._download(miss, hold, None)
        record = SourceRecord(digest_of(source.body), self.lifetimes.fresh_until(time.time()))
        return Current(record, source.body, source)

    def _shared(self, miss: Miss, hold: Hold) -> Current:
        skey = miss.key.kept_source
        look = self.cache.look(skey)
        record, kept = look.record, look.entry
        found = self._usable(record, kept, miss.stale)
        if found is not None:
            return found
        with self.cache.claim(skey, miss.deadline, stale=look.raw) as claim:
            if claim.entry is not None:
                # Another request fetched (or renewed, or failed) while this one waited.
                if not claim.entry.ok and claim.entry.status != _NOT_MODIFIED:
                    raise claim.entry.as_error()
                record = self.cache.get_record(miss.key)
                again = self._usable(record, claim.entry if claim.entry.ok else None, miss.stale)
                return again or self._fetch(miss, hold, record, None)
            if not claim.holder:
                return self._fetch(miss, hold, record, kept)  # render in parallel
            # Holding the claim: re-read the record, a previous holder may just have renewed it.
            record = self.cache.get_record(miss.key)
            found = self._usable(record, kept, miss.stale)
            if found is not None:
                self.cache.finish(skey, claim, Outcome(SHARE, _RENEWED))
                return found
            try:
                result = self._fetch(miss, hold, record, kept)
                keep = self._keep(result, kept)
            except ProxyError as exc:
                # About the upstream or the body: the waiters of the moment get it too. The
                # holder's own budget: they try themselves.
                self.cache.finish(skey, claim, Outcome(SHARE, CacheEntry.from_error(exc)) if exc.cacheable
                                  else Outcome(RELEASE))
                raise
            self.cache.finish(skey, claim, keep)  # a kept body counts against SOURCE_CACHE_BYTES
            return result

    def _usable(self, record: SourceRecord | None, kept: CacheEntry | None, stale: CacheEntry | None) -> Current | None:
        if record is None or not record.is_fresh(time.time()):
            return None
        if stale is not None and stale.meta.get("source_digest") == record.digest:
            return Current(record, None)
        if kept is not None and kept.ok and kept.meta.get("source_digest") == record.digest:
            metrics.SOURCE_REUSE.inc()
            return Current(record, kept.body)
        return None

    def _download(self, miss: Miss, hold: Hold, validators: Validators | None) -> Source:
        source = self.fetcher.fetch_source(miss.request.url, miss.url_policy, deadline=miss.deadline,
                                           validators=validators, hold_bytes=hold)
        miss.timings.upstream_s = source.fetch_seconds
        miss.timings.source_bytes = len(source.body)
        return source

    def _fetch(self, miss: Miss, hold: Hold, record: SourceRecord | None, kept: CacheEntry | None) -> Current:
        stale = miss.stale
        have = {entry.meta.get("source_digest") for entry in (stale, kept) if entry is not None and entry.ok}
        # Ask conditionally only when a 304 would leave something to serve or render.
        validators = None
        if record is not None and record.digest in have:
            validators = Validators(record.etag, record.last_modified)
        revalidating = record is not None or stale is not None
        try:
            source = self._download(miss, hold, validators or None)
        except ProxyError as exc:
            if revalidating:
                metrics.REVALIDATIONS.labels("failed" if exc.kind in UPSTREAM_DOWN else exc.kind).inc()
            if exc.kind in UPSTREAM_DOWN:
                self.cache.mark_failing(miss.key, max(1, self.lifetimes.error_ttl))
            raise
        fresh_until = self.lifetimes.fresh_until(time.time())
        if source.not_modified:
            assert record is not None
            renewed = replace(record, fresh_until=fresh_until, etag=source.validators.etag or record.etag,
                              last_modified=source.validators.last_modified or record.last_modified)
            result = "not_modified"
            body = None if stale is not None and stale.meta.get("source_digest") == record.digest else (
                kept.body if kept is not None else None)
            current = Current(renewed, body, source)
        else:
            digest = digest_of(source.body)
            renewed = SourceRecord(digest, fresh_until, source.validators.etag, source.validators.last_modified)
            result = "unchanged" if record is not None and record.digest == digest else "changed"
            unchanged = stale is not None and stale.meta.get("source_digest") == digest
            current = Current(renewed, None if unchanged else source.body, source)
        if revalidating:
            metrics.REVALIDATIONS.labels(result).inc()
        # A record that cannot be written costs a later revalidation, never this answer.
        with contextlib.suppress(CacheUnavailable):
            self.cache.put_record(miss.key, renewed, self.lifetimes.record_ttl)
        return current

    def _keep(self, result: Current, kept: CacheEntry | None) -> Outcome:
        """How the source claim ends: the body kept (only an image that sniffs as a supported
        format, within SOURCE_MAX_BYTES and SOURCE_CACHE_BYTES), or the waiters told to read the
        record. A body that
        is not an image is the waiters' failure too (raised: BadSource)."""
        body = result.fetched.body if result.fetched is not None and result.fetched.body else None
        if body is not None:
            supported_format(body, self.settings.input_formats)
        elif kept is not None and kept.meta.get("source_digest") == result.record.digest:
            body = kept.body  # a 304 renewed the kept source too
        too_large = len(body) > min(self.settings.source_max_bytes, self.settings.source_cache_limit) if body else False
        if body is None or not self.lifetimes.source_ttl or too_large:
            return Outcome(SHARE, _RENEWED)
        entry = CacheEntry(status=200, body=body, content_type="application/octet-stream",
                           meta={"source_digest": result.record.digest, "fresh_until": result.record.fresh_until})
        return Outcome(STORE, entry, self.lifetimes.source_ttl * 1000)
