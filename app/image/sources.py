"""The current source of a variant: kept, fetched once fleet-wide, or revalidated.

`SourceProvider.current(...)` answers a render holder's question "what do I render from?":

    source record fresh ──stale entry rendered from it──► Renewed (no fetch, no render)
        │               ──kept source matches it───────► the kept body (a reuse hit)
        ▼ otherwise
    source claim (one per source URL, fleet-wide; same rules as the render claim)
        ├─ another request fetched: use its kept body / renewed record, or its failure
        └─ holder: conditional GET when there is something to renew, else a plain GET
              304 / same bytes ─► record renewed (fresh_until = now + CACHE_TTL)
              200 new bytes   ─► record replaced, body kept SOURCE_TTL (if <= SOURCE_MAX_BYTES)
              failure         ─► handed to the waiters; 5xx / refused / timeout also set a
                                 short failure marker so stale answers skip the retry

A kept source feeds a render only while the record vouches for its digest and is fresh, so
a source past CACHE_TTL is never rendered unrevalidated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from app import metrics
from app.cache import Cache, CacheEntry, CacheKey
from app.errors import ProxyError, UpstreamFailed
from app.fetch import Fetcher, Source
from app.guard import SourceURL, URLPolicy
from app.image.freshness import SourceRecord, digest_of
from app.settings import Settings

log = logging.getLogger("image_proxy.sources")

#: Failures that mean "the upstream is down", not "the source is gone or bad": a stale entry
#: is served for these (SPEC §10), and only these.
UPSTREAM_DOWN = frozenset({"upstream_failed", "upstream_timeout", "too_many_redirects"})
_NOT_MODIFIED = 304


@dataclass(frozen=True)
class Current:
    """The record now in force, and the body to render from (None: the stale entry is
    current again, nothing to render)."""

    record: SourceRecord
    body: bytes | None
    fetched: Source | None = None  # set when this request downloaded it


class SourceProvider:
    def __init__(self, settings: Settings, cache: Cache, kept: Cache, fetcher: Fetcher) -> None:
        self.settings = settings
        self.cache = cache
        self.kept = kept  # entries are kept sources: TTL SOURCE_TTL, cap SOURCE_MAX_BYTES
        self.fetcher = fetcher

    def current(self, key: CacheKey, url: SourceURL, url_policy: URLPolicy, deadline: float,
                stale: CacheEntry | None, hold_bytes: Callable[[int], None] | None = None) -> Current:
        """The current source of `key`: kept, renewed by a 304, or fetched (one fetch per
        source fleet-wide). `hold_bytes` admits a fetched body into the memory budget."""
        skey = key.kept_source
        look = self.kept.look(skey)
        record, kept = SourceRecord.from_bytes(look.record), look.entry
        found = self._usable(record, kept, stale)
        if found is not None:
            return found
        with self.kept.claim(skey, deadline, stale=kept) as claim:
            if claim.entry is not None:
                # Another request fetched (or renewed, or failed) while this one waited.
                if not claim.entry.ok and claim.entry.status != _NOT_MODIFIED:
                    raise _error_from(claim.entry)
                record = SourceRecord.from_bytes(self.cache.get_record(key))
                again = self._usable(record, claim.entry if claim.entry.ok else None, stale)
                if again is not None:
                    return again
                return self._fetch(key, url, url_policy, deadline, record, stale, None, hold_bytes)
            if not claim.holder:
                # The holder's source was too large to keep: each fetches its own, in parallel.
                return self._fetch(key, url, url_policy, deadline, record, stale, kept, hold_bytes)
            # Holding the claim: re-read the record, a previous holder may just have renewed it.
            record = SourceRecord.from_bytes(self.cache.get_record(key))
            found = self._usable(record, kept, stale)
            if found is not None:
                self.kept.finish(skey, claim, _marker(), cacheable=False)
                return found
            try:
                result = self._fetch(key, url, url_policy, deadline, record, stale, kept, hold_bytes)
            except ProxyError as exc:
                self.kept.finish(skey, claim, _error_entry(exc), cacheable=False)
                raise
            self._finish_holder(skey, claim, result, kept)
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

    def _fetch(self, key: CacheKey, url: SourceURL, url_policy: URLPolicy, deadline: float,
               record: SourceRecord | None, stale: CacheEntry | None, kept: CacheEntry | None,
               hold_bytes: Callable[[int], None] | None = None) -> Current:
        have = {entry.meta.get("source_digest") for entry in (stale, kept) if entry is not None and entry.ok}
        # Ask conditionally only when a 304 would leave something to serve or render.
        validators = record.validators if record is not None and record.digest in have else None
        revalidating = record is not None or stale is not None
        try:
            source = self.fetcher.fetch_source(url, url_policy, deadline=deadline, validators=validators or None,
                                               hold_bytes=hold_bytes)
        except ProxyError as exc:
            if revalidating:
                metrics.REVALIDATIONS.labels("failed" if exc.kind in UPSTREAM_DOWN else exc.kind).inc()
            if exc.kind in UPSTREAM_DOWN:
                self.cache.mark_failing(key, max(1, self.settings.error_ttl))
            raise
        now = time.time()
        fresh_until = now + self.settings.cache_ttl
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
        self.cache.put_record(key, renewed.to_bytes(), self.settings.cache_ttl + self.settings.stale_ttl)
        return current

    def _finish_holder(self, skey: CacheKey, claim: object, result: Current, kept: CacheEntry | None) -> None:
        body = result.fetched.body if result.fetched is not None and result.fetched.body else None
        if body is None and kept is not None and kept.meta.get("source_digest") == result.record.digest:
            body = kept.body  # a 304 renewed the kept source too
        if body is None:
            self.kept.finish(skey, claim, _marker(), cacheable=False)  # type: ignore[arg-type]
            return
        entry = CacheEntry(status=200, body=body, content_type="application/octet-stream",
                           meta={"source_digest": result.record.digest, "fresh_until": result.record.fresh_until})
        self.kept.finish(skey, claim, entry, cacheable=self.settings.source_ttl > 0)  # type: ignore[arg-type]


def _marker() -> CacheEntry:
    """Handed to the source claim's waiters when there is no body to keep: "the record was
    renewed, read it"."""
    return CacheEntry(status=_NOT_MODIFIED, body=b"", content_type="")


def _error_entry(exc: ProxyError) -> CacheEntry:
    return CacheEntry(status=exc.status, body=b"", content_type="application/json", error=exc.message,
                      kind=exc.kind, retry_after=exc.retry_after)


def _subclasses(cls: type[ProxyError]) -> list[type[ProxyError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_subclasses(sub))
    return found


def _error_from(entry: CacheEntry) -> ProxyError:
    """The failure another request's fetch met, as the same ProxyError class (so its status,
    kind and cacheability are the ones that request would have had)."""
    cls = next((c for c in _subclasses(ProxyError) if c.kind == entry.kind), UpstreamFailed)
    exc = cls.__new__(cls)
    ProxyError.__init__(exc, entry.error or "upstream failed", retry_after=entry.retry_after)
    return exc
