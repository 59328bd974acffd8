"""Freshness of cached variants, per source: pure rules, no Redis, no clock of its own.

Every variant of one source URL consults one small record (`SourceRecord`, stored by
app/cache.py): the upstream's
validators, a digest of the source bytes, and `fresh_until`. A variant carries the digest it
was rendered from and the record's `fresh_until` at that time (its stamp). So:

- FRESH: the record vouches for the variant's digest and `now < fresh_until` (or, with no
  record, the variant's own stamp is in the future). One 304 renews the record, and with it
  every variant of that source, without touching them.
- STALE: freshness ended, but `now < fresh_until + STALE_TTL`: revalidate, and serve this
  entry (X-Cache: STALE) if the upstream fails. Only a successful validation moves
  `fresh_until`, so a failed one never extends the stale window.
- EXPIRED: past the stale window: a miss whose failure is answered as the error.

A variant whose digest differs from the record's was rendered from an older source: it is
STALE at best (the source changed), never FRESH. Error entries and entries written before
this scheme (no digest) are FRESH for as long as Redis keeps them.

`Lifetimes` is the one place the lifetimes are computed from the settings (CACHE_TTL,
STALE_TTL, ERROR_TTL, SOURCE_TTL): how long an image, a failure, a source record and a kept
source live in Redis. Nothing else reads those settings.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from app.cache import CacheEntry, Look, SourceRecord
from app.settings import Settings

FRESH, STALE, EXPIRED = "fresh", "stale", "expired"


def stamped(entry: CacheEntry, record: SourceRecord) -> CacheEntry:
    """The entry marked as rendered from `record`'s source, fresh as long as it is."""
    return CacheEntry(
        status=entry.status, body=entry.body, content_type=entry.content_type, etag=entry.etag,
        meta={**entry.meta, "source_digest": record.digest, "fresh_until": record.fresh_until},
    )


def state(entry: CacheEntry, record: SourceRecord | None, now: float, stale_ttl: int) -> str:
    digest = entry.meta.get("source_digest")
    if not entry.ok or not isinstance(digest, str):
        return FRESH
    stamp = float(entry.meta.get("fresh_until", 0) or 0)
    if record is not None and record.digest == digest:
        until = max(stamp, record.fresh_until)
    else:
        until = stamp
        if record is not None:
            # The source changed since this render: never fresh, but servable if it fails.
            return STALE if now < until + stale_ttl else EXPIRED
    if now < until:
        return FRESH
    return STALE if now < until + stale_ttl else EXPIRED


def digest_of(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=16).hexdigest()


@dataclass(frozen=True)
class Lifetimes:
    """Every lifetime of the cache, in seconds, and the rules that use them."""

    cache_ttl: int  # an image (and its source record) is fresh this long after a fetch
    stale_ttl: int  # then kept this much longer: revalidated, served STALE if the upstream fails
    error_ttl: int  # a failure about the image or the upstream is shared this long
    source_ttl: int  # a downloaded source is kept this long for the other variants

    @classmethod
    def from_settings(cls, settings: Settings) -> Lifetimes:
        return cls(settings.cache_ttl, settings.stale_ttl, settings.error_ttl, settings.source_ttl)

    def fresh_until(self, now: float) -> float:
        """The end of freshness of a source fetched (or revalidated) at `now`."""
        return now + self.cache_ttl

    @property
    def record_ttl(self) -> int:
        """A source record outlives every variant it vouches for: freshness plus the stale window."""
        return self.cache_ttl + self.stale_ttl

    def entry_ttl_ms(self, entry: CacheEntry, now: float) -> int:
        """How long Redis keeps an entry: an image until its stale window ends (its stamp
        plus STALE_TTL); a failure ERROR_TTL."""
        if not entry.ok:
            return self.error_ttl * 1000
        fresh_until = entry.meta.get("fresh_until")
        if not isinstance(fresh_until, (int, float)):
            return self.record_ttl * 1000
        return max(1, int(fresh_until + self.stale_ttl - now) + 1) * 1000

    def state_of(self, look: Look, now: float) -> str | None:
        """FRESH, STALE or EXPIRED for the entry a look found; None when there was none."""
        if look.entry is None:
            return None
        return state(look.entry, look.record, now, self.stale_ttl)
