"""The render claim's exactly-once rules, against a real redis-server (app/cache.py)."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import redis

from app.cache import PASS, Cache, CacheEntry, CacheKey, RenderLock, make_client
from app.embedded_redis import start_embedded_redis

IMAGE = CacheEntry(status=200, body=b"image-bytes", content_type="image/webp", etag='"e1"')
OTHER_IMAGE = CacheEntry(status=200, body=b"other-image", content_type="image/webp", etag='"e2"')
FAILURE = CacheEntry(status=502, body=b"", content_type="application/json", error="upstream answered 503",
                     kind="upstream_failed")


def make_cache(url: str, **overrides: int) -> Cache:
    options = {"ttl": 60, "error_ttl": 10, "lock_expire": 10, "max_entry_bytes": 1000, **overrides}
    return Cache(make_client(url, timeout=1), make_client(url, timeout=3), **options)


@pytest.fixture
def cache(redis_server, redis_client) -> Cache:
    return make_cache(redis_server.url)


def key(name: str = "a") -> CacheKey:
    return CacheKey(f"src-{name}", "variant")


def deadline(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_a_holder_stores_and_a_late_claimer_reads_the_entry_instead_of_rendering(cache):
    with cache.claim(key(), deadline()) as claim:
        assert claim.holder
        cache.finish(key(), claim, IMAGE)
    # The lock is free and the entry is there: a request that missed before the store and
    # claims now must get the entry, not the lock.
    with cache.claim(key(), deadline()) as late:
        assert not late.holder
        assert late.entry == IMAGE


def test_an_error_never_replaces_a_stored_image(cache, redis_client):
    with cache.claim(key(), deadline()) as first:
        cache.finish(key(), first, IMAGE)
    # Another holder (e.g. after the first's lock lapsed) fails: the image stays.
    lock = RenderLock(cache.wait_client, key().lock, expire=10)
    assert lock.acquire(blocking=False)
    from app.cache import Claim

    cache.finish(key(), Claim(holder=True, lock=lock), FAILURE)
    assert cache.get(key()) == IMAGE
    # Nor does one from a holder whose lock lapsed meanwhile.
    late = RenderLock(cache.wait_client, key().lock, expire=10)
    assert late.acquire(blocking=False)
    cache.wait_client.delete("lock:" + key().lock)
    cache.finish(key(), Claim(holder=True, lock=late), FAILURE)
    assert cache.get(key()) == IMAGE


def test_a_holder_that_lost_its_lock_does_not_overwrite_the_newer_entry(cache, redis_client):
    with cache.claim(key(), deadline()) as stale:
        assert stale.holder
        redis_client.delete("lock:" + key().lock)  # its lock expired
        with cache.claim(key(), deadline()) as newer:
            assert newer.holder
            cache.finish(key(), newer, OTHER_IMAGE)
        cache.finish(key(), stale, IMAGE)
    assert cache.get(key()) == OTHER_IMAGE


def wait_in_threads(cache: Cache, count: int, budget: float = 5.0) -> tuple[list, list[threading.Thread]]:
    results: list = []

    def wait() -> None:
        started = time.monotonic()
        with cache.claim(key(), deadline(budget)) as claim:
            results.append((claim, time.monotonic() - started))

    threads = [threading.Thread(target=wait) for _ in range(count)]
    for thread in threads:
        thread.start()
    return results, threads


def test_a_failure_that_is_not_cached_is_handed_to_every_waiter_of_that_moment(cache):
    with cache.claim(key(), deadline()) as claim:
        results, threads = wait_in_threads(cache, 8)
        time.sleep(0.3)  # all eight are waiting on the lock
        assert cache.finish(key(), claim, FAILURE, cacheable=False) == "handoff"
    for thread in threads:
        thread.join(5)
    assert len(results) == 8
    assert all(found.entry == FAILURE and found.handed_off for found, _ in results)
    assert all(waited < 0.9 for _, waited in results), "woken at once, not after a wait step"
    assert cache.get(key()) is None, "handed over, never stored"


def test_an_output_too_large_to_store_lets_the_waiters_render_in_parallel_at_once(cache):
    big = CacheEntry(status=200, body=b"x" * 5000, content_type="image/webp")
    with cache.claim(key(), deadline()) as claim:
        results, threads = wait_in_threads(cache, 8)
        time.sleep(0.3)
        assert cache.finish(key(), claim, big) == PASS
    for thread in threads:
        thread.join(5)
    assert len(results) == 8
    # None of them holds the lock, so they render side by side, not one after another.
    assert all(found.entry is None and not found.holder for found, _ in results)
    assert all(waited < 0.9 for _, waited in results)


def test_error_ttl_zero_hands_the_error_over_instead_of_serializing(redis_server, redis_client):
    cache = make_cache(redis_server.url, error_ttl=0)
    with cache.claim(key(), deadline()) as claim:
        results, threads = wait_in_threads(cache, 4)
        time.sleep(0.3)
        assert cache.finish(key(), claim, FAILURE) == "handoff"
    for thread in threads:
        thread.join(5)
    assert [found.entry for found, _ in results] == [FAILURE] * 4


def test_a_holder_leaving_by_an_exception_frees_the_waiters(cache):
    results, threads = [], []
    with pytest.raises(RuntimeError), cache.claim(key(), deadline()) as claim:
        assert claim.holder
        results, threads = wait_in_threads(cache, 3)
        time.sleep(0.3)
        raise RuntimeError("a bug in the render")
    for thread in threads:
        thread.join(5)
    assert len(results) == 3 and all(not found.holder and found.entry is None for found, _ in results)


@pytest.mark.parametrize(
    "raw",
    [
        b"IPC1I\x00\x00\x00\x05notjs",
        b"IPC1",
        b"garbage",
        b"IPC1I\x00\x00\x00\x02[]",
        b"IPC1I\x00\x00\x00\x0e{\"status\":200}",
    ],
)
def test_unreadable_entries_are_misses(cache, redis_client, raw):
    redis_client.set(key().entry, raw)
    assert cache.get(key()) is None


def test_an_entry_from_a_version_with_an_extra_field_still_reads(cache, redis_client):
    import json

    head = json.dumps({"status": 200, "content_type": "image/webp", "etag": '"x"', "added_later": 1}).encode()
    redis_client.set(key().entry, b"IPC1I" + len(head).to_bytes(4, "big") + head + b"body")
    entry = cache.get(key())
    assert entry is not None and entry.body == b"body" and entry.etag == '"x"'


def test_lock_renewal_survives_a_redis_stall():
    server = start_embedded_redis()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=0.1)
        lock = RenderLock(client, "stall-test", expire=2, auto_renewal=True)
        assert lock.acquire(blocking=False)
        # Renewal runs every 2/3 of the expiry (1.33 s): stall Redis across it, so that
        # renewal times out; the stock renewer would die and the lock lapse at 2 s.
        time.sleep(1.2)
        server.process.send_signal(signal.SIGSTOP)
        time.sleep(0.45)
        server.process.send_signal(signal.SIGCONT)
        time.sleep(1.3)  # past the original 2 s expiry
        assert client.get("lock:stall-test") == lock.id.encode(), "the lock was renewed after the stall"
        assert not lock.lost
        lock.release()
    finally:
        server.stop()
