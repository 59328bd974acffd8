"""The miss path's one model (app/image/miss.py, serve.py, sources.py) against a real
redis-server and a real loopback upstream: what is shared, what is stored, what is kept."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from app.cache import PASS, RELEASE, SHARE, STORE, CacheEntry, CacheKey
from app.errors import BadSource, Busy, UpstreamFailed
from app.factory import create_app
from app.guard import URLPolicy, parse_source_url
from app.image.freshness import Lifetimes
from app.image.miss import MISS, STALE, Miss, Served, decide
from app.image.params import ImageRequest

PHOTO = "photos/portrait_1200x1800.jpg"
LIFETIMES = Lifetimes(cache_ttl=100, stale_ttl=50, error_ttl=10, source_ttl=30)


def image_path(url: str, **params: object) -> str:
    extra = "".join(f"&{k}={v}" for k, v in params.items())
    return f"/image?url={quote(url, safe='')}{extra}"


# -- decide: the one decision, as a pure function -------------------------------------------


def a_miss() -> Miss:
    request = ImageRequest(parse_source_url("http://127.0.0.1:9/a.jpg"), 64, 75, "webp")
    return Miss.begin(request, URLPolicy(), 30)


IMAGE = CacheEntry(200, b"img", "image/webp", meta={"fresh_until": 1000.0})


def test_an_image_is_stored_until_its_stale_window_ends():
    outcome = decide(Served(IMAGE, MISS), a_miss(), LIFETIMES, 1000, now=900.0)
    assert outcome.action == STORE and outcome.ttl_ms == (1000 - 900 + 50 + 1) * 1000


def test_an_image_too_large_to_store_lets_the_waiters_render_in_parallel():
    outcome = decide(Served(IMAGE, MISS), a_miss(), LIFETIMES, 2, now=900.0)
    assert outcome.action == PASS


@pytest.mark.parametrize("failure", [BadSource("not an image"), UpstreamFailed("upstream answered 500")])
def test_a_failure_about_the_image_or_the_upstream_is_shared(failure):
    served = Served(CacheEntry.from_error(failure), MISS, error=failure)
    stored = decide(served, a_miss(), LIFETIMES, 1000, now=0.0)
    assert stored.action == STORE and stored.ttl_ms == 10_000
    no_error_ttl = Lifetimes(100, 50, 0, 30)
    assert decide(served, a_miss(), no_error_ttl, 1000, now=0.0).action == SHARE


def test_a_holders_own_budget_failure_is_not_handed_to_anyone():
    busy = Busy("this request ran out of time")
    served = Served(CacheEntry.from_error(busy), MISS, error=busy)
    assert decide(served, a_miss(), LIFETIMES, 1000, 0.0).action == RELEASE


def test_a_stale_answer_goes_to_this_moments_waiters_only_marked_stale():
    outcome = decide(Served(IMAGE, STALE), a_miss(), LIFETIMES, 1000, now=0.0)
    assert outcome.action == SHARE and outcome.entry is not None and outcome.entry.meta["served_stale"]


def test_the_error_codec_round_trips_the_class_and_its_cacheability():
    for failure in (BadSource("x"), UpstreamFailed("y"), Busy("z", retry_after=3)):
        back = CacheEntry.from_error(failure).as_error()
        assert type(back) is type(failure) and back.message == failure.message
        assert back.retry_after == failure.retry_after and back.cacheable == failure.cacheable


# -- a connect cut short ---------------------------------------------------------------------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback listener whose accept queue is full: a new connect hangs (its SYN is
    dropped) until the client's own timeout, like a blackholed upstream."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.1)
    yield port
    for filler in fillers:
        filler.close()
    server.close()


def test_a_connect_cut_by_the_request_budget_is_a_503_never_stored(settings, redis_client, silent_port):
    app = create_app(settings.replace(request_budget=1.0, upstream_timeout=20.0))
    path = image_path(f"http://127.0.0.1:{silent_port}/a.jpg", w=64)
    response = app.test_client().get(path)
    assert response.status_code == 503 and response.headers["Retry-After"].isdigit()
    assert redis_client.keys("ip:*:v:*") == [], "a budget failure is never stored"
    assert redis_client.keys("ip:*:f") == [], "nor does it mark the source failing"


def test_a_connect_cut_by_upstream_timeout_is_a_504_and_marks_the_source(settings, redis_client, silent_port):
    app = create_app(settings.replace(request_budget=30.0, upstream_timeout=0.5))
    response = app.test_client().get(image_path(f"http://127.0.0.1:{silent_port}/a.jpg", w=64))
    assert response.status_code == 504
    assert len(redis_client.keys("ip:*:v:*")) == 1 and len(redis_client.keys("ip:*:f")) == 1


# -- kept sources ----------------------------------------------------------------------------


def test_a_body_that_is_not_an_image_is_never_kept(client, upstream, redis_client):
    junk = os.urandom(64 * 1024)
    upstream.blobs["junk.bin"] = junk
    response = client.get(image_path(upstream.url("blob/junk.bin"), w=64))
    assert response.status_code == 400
    assert redis_client.keys("ip:{*}:src") == [], "junk is not kept"


def test_an_image_is_kept_and_counted_against_the_kept_source_cap(client, upstream, redis_client):
    assert client.get(image_path(upstream.url(PHOTO), w=64)).status_code == 200
    kept = redis_client.keys("ip:{*}:src")
    assert len(kept) == 1
    entry = CacheEntry.from_bytes(redis_client.get(kept[0]))
    assert entry is not None
    assert int(redis_client.hget("ip:{kept}:sizes", "_total")) == len(entry.body)


def test_kept_sources_past_the_cap_drop_the_oldest_not_the_images(settings, upstream, redis_client):
    app = create_app(settings.replace(source_cache_bytes=1))
    client = app.test_client()
    photos = ["photos/portrait_1200x1800.jpg", "photos/waterfall_1800x1200.jpg", "photos/insect_2560x1280.jpg"]
    for photo in photos:
        assert client.get(image_path(upstream.url(photo), w=48)).status_code == 200
    assert redis_client.keys("ip:{*}:src") == [], "each kept source went over the 1-byte cap"
    assert len(redis_client.keys("ip:*:v:*")) == 3
    for photo in photos:
        assert client.get(image_path(upstream.url(photo), w=48)).headers["X-Cache"] == "HIT"


def test_one_look_per_request_the_view_reuses_the_fresh_hit_layers(client, upstream, redis_client):
    path = image_path(upstream.url(PHOTO), w=72)
    before = redis_client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0)
    assert client.get(path).headers["X-Cache"] == "MISS"
    after = redis_client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0)
    # The variant's look, the kept source's look and a waiter-free claim: no second look of
    # the variant by the view (it was 3 before: fresh-hit layer, view, kept source).
    assert after - before == 2


def test_cache_keys_hold_full_digests():
    key = ImageRequest(parse_source_url("http://127.0.0.1:9/a.jpg"), 64, 75, "webp").cache_key()
    assert isinstance(key, CacheKey) and len(key.source) == 64 and len(key.variant) == 64
