"""The render claim's exactly-once rules, against a real redis-server (app/cache.py)."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import redis

from app.cache import (
    HANDOFF_MS,
    PASS,
    RELEASE,
    SHARE,
    STORE,
    Cache,
    CacheEntry,
    CacheKey,
    CacheUnavailable,
    Claim,
    Outcome,
    RedisHealth,
    RenderLock,
    make_client,
)
from app.embedded_redis import start_embedded_redis

IMAGE = CacheEntry(status=200, body=b"image-bytes", content_type="image/webp", etag='"e1"')
OTHER_IMAGE = CacheEntry(status=200, body=b"other-image", content_type="image/webp", etag='"e2"')
FAILURE = CacheEntry(status=502, body=b"", content_type="application/json", error="upstream answered 503",
                     kind="upstream_failed")


def make_cache(url: str, lock_expire: int = 10) -> Cache:
    return Cache(make_client(url, timeout=1), make_client(url, timeout=3), lock_expire=lock_expire)


def stored(entry: CacheEntry) -> Outcome:
    return Outcome(STORE, entry, 60_000)


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
        cache.finish(key(), claim, stored(IMAGE))
    # The lock is free and the entry is there: a request that missed before the store and
    # claims now must get the entry, not the lock.
    with cache.claim(key(), deadline()) as late:
        assert not late.holder
        assert late.entry == IMAGE


def test_an_error_never_replaces_a_stored_image(cache, redis_client):
    with cache.claim(key(), deadline()) as first:
        cache.finish(key(), first, stored(IMAGE))
    # Another holder (e.g. after the first's lock lapsed) fails: the image stays.
    lock = RenderLock(cache.wait_client, key().lock, expire=10)
    assert lock.acquire(blocking=False)
    cache.finish(key(), Claim(holder=True, lock=lock), stored(FAILURE))
    assert cache.get(key()) == IMAGE
    # Nor does one from a holder whose lock lapsed meanwhile.
    late = RenderLock(cache.wait_client, key().lock, expire=10)
    assert late.acquire(blocking=False)
    cache.wait_client.delete("lock:" + key().lock)
    cache.finish(key(), Claim(holder=True, lock=late), stored(FAILURE))
    assert cache.get(key()) == IMAGE


def test_a_holder_that_lost_its_lock_does_not_overwrite_the_newer_entry(cache, redis_client):
    with cache.claim(key(), deadline()) as stale:
        assert stale.holder
        redis_client.delete("lock:" + key().lock)  # its lock expired
        with cache.claim(key(), deadline()) as newer:
            assert newer.holder
            cache.finish(key(), newer, stored(OTHER_IMAGE))
        cache.finish(key(), stale, stored(IMAGE))
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
        assert cache.finish(key(), claim, Outcome(SHARE, FAILURE))
    for thread in threads:
        thread.join(5)
    assert len(results) == 8
    assert all(found.entry == FAILURE and found.handed_off for found, _ in results)
    assert all(waited < 0.9 for _, waited in results), "woken at once, not after a wait step"
    assert cache.get(key()) is None, "handed over, never stored"


def test_an_output_too_large_to_store_lets_the_waiters_render_in_parallel_at_once(cache):
    with cache.claim(key(), deadline()) as claim:
        results, threads = wait_in_threads(cache, 8)
        time.sleep(0.3)
        assert cache.finish(key(), claim, Outcome(PASS))
    for thread in threads:
        thread.join(5)
    assert len(results) == 8
    # None of them holds the lock, so they render side by side, not one after another.
    assert all(found.entry is None and not found.holder for found, _ in results)
    assert all(waited < 0.9 for _, waited in results)


def test_a_holders_own_failure_lets_exactly_one_waiter_take_over(cache):
    """RELEASE (the holder's budget or memory ran out): its 503 is not handed to anyone; the
    next waiter takes the lock and tries, the others wait for that one's result."""
    holders: list[int] = []
    answers: list[CacheEntry | None] = []
    lock = threading.Lock()

    def wait(index: int) -> None:
        with cache.claim(key(), deadline()) as claim:
            if claim.holder:
                with lock:
                    holders.append(index)
                time.sleep(0.2)
                cache.finish(key(), claim, stored(IMAGE))
            else:
                with lock:
                    answers.append(claim.entry)

    with cache.claim(key(), deadline()) as claim:
        threads = [threading.Thread(target=wait, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        cache.finish(key(), claim, Outcome(RELEASE))
    for thread in threads:
        thread.join(5)
    assert len(holders) == 1, "exactly one waiter takes over"
    assert answers == [IMAGE] * 5, "the others read its result"


def test_no_wake_up_signal_outlives_the_handoff_window(cache, redis_client):
    with cache.claim(key(), deadline()) as claim:
        results, threads = wait_in_threads(cache, 8)
        time.sleep(0.3)
        cache.finish(key(), claim, stored(IMAGE))
    for thread in threads:
        thread.join(5)
    assert len(results) == 8 and all(found.entry == IMAGE for found, _ in results)
    # One signal passed from waiter to waiter: at most one is left, and it expires.
    assert redis_client.llen(key().wake) <= 1
    assert redis_client.pttl(key().wake) <= HANDOFF_MS
    assert redis_client.keys("ip:*:n:*") == [], "no waiter count is kept"


def test_a_holder_leaving_by_an_exception_hands_the_key_to_a_waiter_at_once(cache, redis_client):
    results, threads = [], []
    with pytest.raises(RuntimeError), cache.claim(key(), deadline()) as claim:
        assert claim.holder
        results, threads = wait_in_threads(cache, 3)
        time.sleep(0.3)
        raise RuntimeError("a bug in the render")
    for thread in threads:
        thread.join(5)
    # Each waiter in turn finds the key free (nobody finished with an answer) and takes it,
    # long before the 10 s lock expiry; none is left holding it.
    assert len(results) == 3 and all(found.holder for found, _ in results)
    assert max(waited for _, waited in results) < 2
    assert not redis_client.exists("lock:" + key().lock)


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
        lock.release()
    finally:
        server.stop()


def test_while_redis_is_down_calls_skip_it_at_once_and_one_probe_brings_it_back():
    server = start_embedded_redis()
    try:
        cache = make_cache(server.url)
        # A window long enough that the 20 calls below all fall inside it, even on a busy machine.
        cache.health = RedisHealth(down_s=2.0)
        cache.client = make_client(server.url, timeout=0.2)
        assert cache.get(key()) is None
        server.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(CacheUnavailable):
                cache.get(key())  # pays the timeout once
            first = time.monotonic() - started
            skipped = []
            window_ends = started + first + 2.0
            for _ in range(20):
                if time.monotonic() > window_ends - 0.2:
                    break
                started = time.monotonic()
                with pytest.raises(CacheUnavailable):
                    cache.get(key())
                skipped.append(time.monotonic() - started)
            assert first >= 0.2
            assert skipped and max(skipped) < 0.2 / 2, "skipped at once, not after another timeout"
        finally:
            server.process.send_signal(signal.SIGCONT)
        give_up = time.monotonic() + 5
        while time.monotonic() < give_up:
            try:
                cache.get(key())
                break
            except CacheUnavailable:
                time.sleep(0.05)
        assert not cache.health.down, "a probe after the window found Redis again"
    finally:
        server.stop()


def test_kept_sources_past_their_cap_drop_the_oldest(redis_server, redis_client):
    cache = Cache(make_client(redis_server.url, timeout=1), make_client(redis_server.url, timeout=3),
                  lock_expire=10, kept_cap=250)
    kept = [CacheKey(f"src-{i}", "src").kept_source for i in range(5)]
    body = CacheEntry(status=200, body=b"x" * 100, content_type="application/octet-stream")
    for skey in kept:
        with cache.claim(skey, deadline()) as claim:
            assert claim.holder
            cache.finish(skey, claim, Outcome(STORE, body, 60_000))
    # 100 bytes each under a 250-byte cap: only the two newest stay.
    assert [bool(redis_client.exists(skey.entry)) for skey in kept] == [False, False, False, True, True]
    assert int(redis_client.hget("ip:{kept}:sizes", "_total")) == 200


def test_a_holder_finishes_even_while_redis_is_being_skipped(cache, redis_client):
    with cache.claim(key(), deadline()) as claim:
        assert claim.holder
        # Another call of this worker timed out a moment ago: calls are being skipped.
        cache.health.failed("get", TimeoutError("a slow answer"))
        assert cache.finish(key(), claim, stored(IMAGE))
    assert redis_client.get(key().entry) is not None, "the result is stored, not thrown away"
    assert not redis_client.exists("lock:" + key().lock), "and the lock is not left to expire"


def test_a_holder_whose_lock_lapsed_still_replaces_the_entry_it_judged_stale(cache, redis_client):
    redis_client.set(key().entry, IMAGE.to_bytes())
    stale = redis_client.get(key().entry)
    with cache.claim(key(), deadline(), stale=stale) as claim:
        assert claim.holder
        redis_client.delete("lock:" + key().lock)  # renewal failed during a stall
        cache.finish(key(), claim, Outcome(STORE, OTHER_IMAGE, 60_000, replaces=stale))
    assert cache.get(key()) == OTHER_IMAGE


def test_a_body_larger_than_the_kept_source_cap_is_not_kept(settings, upstream, redis_client):
    from urllib.parse import quote

    from app.factory import create_app

    app = create_app(settings.replace(source_cache_bytes=1000))
    path = f"/image?url={quote(upstream.url('photos/portrait_1200x1800.jpg'), safe='')}&w=40"
    assert app.test_client().get(path).status_code == 200
    assert redis_client.keys("ip:{*}:src") == []
    assert int(redis_client.hget("ip:{kept}:sizes", "_total") or 0) == 0
