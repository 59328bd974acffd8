"""Freshness of cached variants, per source: pure rules, no Redis, no clock of its own.

Every variant of one source URL consults one small record (`SourceRecord`): the upstream's
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
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from app.cache import CacheEntry
from app.fetch import Validators

FRESH, STALE, EXPIRED = "fresh", "stale", "expired"


@dataclass(frozen=True)
class SourceRecord:
    digest: str
    fresh_until: float  # epoch seconds
    etag: str = ""
    last_modified: str = ""

    @property
    def validators(self) -> Validators:
        return Validators(self.etag, self.last_modified)

    def is_fresh(self, now: float) -> bool:
        return now < self.fresh_until

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> SourceRecord | None:
        """None for a missing or unreadable record (another version's layout): then the
        variants' own stamps decide, and the next fetch writes a new one."""
        if not raw:
            return None
        try:
            data = json.loads(raw)
            return cls(str(data["digest"]), float(data["fresh_until"]), str(data.get("etag", "")),
                       str(data.get("last_modified", "")))
        except (ValueError, TypeError, KeyError):
            return None


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
    import hashlib

    return hashlib.blake2b(body, digest_size=16).hexdigest()
