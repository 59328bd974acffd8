"""The per-source freshness rules (app/image/freshness.py), as a pure function of time."""

from __future__ import annotations

import pytest

from app.cache import CacheEntry, SourceRecord
from app.image.freshness import EXPIRED, FRESH, STALE, stamped, state

RECORD = SourceRecord(digest="d1", fresh_until=1000.0, etag='"e"')
IMAGE = stamped(CacheEntry(status=200, body=b"x", content_type="image/webp"), RECORD)


@pytest.mark.parametrize(("now", "expected"), [(999.0, FRESH), (1000.0, STALE), (1099.0, STALE), (1100.0, EXPIRED)],
                         ids=["fresh", "freshness-ended", "inside-window", "past-window"])
def test_a_variant_follows_its_source_record(now, expected):
    assert state(IMAGE, RECORD, now, stale_ttl=100) == expected


def test_a_renewed_record_makes_an_older_variant_fresh_again():
    renewed = SourceRecord(digest="d1", fresh_until=5000.0)
    assert state(IMAGE, renewed, 2000.0, stale_ttl=100) == FRESH


def test_a_variant_of_a_changed_source_is_never_fresh_but_can_be_served_stale():
    changed = SourceRecord(digest="d2", fresh_until=5000.0)
    assert state(IMAGE, changed, 500.0, stale_ttl=100) == STALE
    assert state(IMAGE, changed, 1100.0, stale_ttl=100) == EXPIRED


def test_without_a_record_the_variant_stamp_decides():
    assert state(IMAGE, None, 999.0, stale_ttl=100) == FRESH
    assert state(IMAGE, None, 1050.0, stale_ttl=100) == STALE


def test_errors_and_entries_from_before_the_scheme_are_fresh_while_redis_keeps_them():
    error = CacheEntry(status=502, body=b"", content_type="application/json", error="down")
    legacy = CacheEntry(status=200, body=b"x", content_type="image/webp")
    assert state(error, RECORD, 10**9, stale_ttl=0) == FRESH
    assert state(legacy, RECORD, 10**9, stale_ttl=0) == FRESH


@pytest.mark.parametrize("raw", [None, b"", b"not json", b"[]", b'{"digest": "d"}'])
def test_unreadable_records_are_none(raw):
    assert SourceRecord.from_bytes(raw) is None


def test_a_record_round_trips():
    assert SourceRecord.from_bytes(RECORD.to_bytes()) == RECORD
