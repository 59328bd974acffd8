"""Failure sharing, concurrent misses and Redis outages, with real redis-server processes."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest

from app.embedded_redis import start_embedded_redis
from app.factory import create_app
from tests.conftest import free_port

PHOTO = "photos/portrait_1200x1800.jpg"


def image_path(upstream, path: str, **params: object) -> str:
    extra = "".join(f"&{k}={v}" for k, v in params.items())
    return f"/image?url={quote(upstream.url(path), safe='')}{extra}"


def test_failing_upstream_requested_concurrently_is_fetched_once_and_shared(app, upstream):
    barrier = threading.Barrier(16)

    def one(_: int) -> tuple[int, str]:
        client = app.test_client()
        barrier.wait()
        response = client.get(image_path(upstream, "slow-image/0.3/status/503"))
        return response.status_code, response.json["error"]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert {status for status, _ in results} == {502}
    assert len({error for _, error in results}) == 1
    assert upstream.hits["/slow-image/0.3/status/503"] == 1


def test_concurrent_identical_misses_render_once(app, upstream):
    barrier = threading.Barrier(12)

    def one(_: int) -> tuple[int, bytes, str]:
        client = app.test_client()
        barrier.wait()
        response = client.get(image_path(upstream, f"slow-image/0.3/{PHOTO}", w=300))
        return response.status_code, response.get_data(), response.headers["X-Cache"]

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    assert {status for status, _, _ in results} == {200}
    assert len({body for _, body, _ in results}) == 1
    assert sorted(cache for _, _, cache in results).count("MISS") == 1
    assert upstream.hits[f"/slow-image/0.3/{PHOTO}"] == 1


def test_error_is_cached_only_for_error_ttl(settings, upstream):
    app = create_app(settings.replace(error_ttl=1))
    client = app.test_client()
    assert client.get(image_path(upstream, "status/500")).status_code == 502
    assert client.get(image_path(upstream, "status/500")).headers["X-Cache"] == "HIT"
    time.sleep(1.2)
    assert client.get(image_path(upstream, "status/500")).headers["X-Cache"] == "MISS"
    assert upstream.hits["/status/500"] == 2


def test_bad_parameters_are_not_cached_and_need_no_redis(client, upstream):
    response = client.get(image_path(upstream, PHOTO, w="x"))
    assert response.status_code == 400
    assert "X-Cache" not in response.headers


@pytest.fixture
def restartable_redis():
    port = free_port()
    servers = [start_embedded_redis(port=port)]

    class Handle:
        url = f"redis://127.0.0.1:{port}/0"

        def stop(self) -> None:
            servers[-1].stop()

        def start(self) -> None:
            servers.append(start_embedded_redis(port=port))

    yield Handle()
    servers[-1].stop()


def test_redis_down_serves_uncached_and_recovers_by_itself(settings, upstream, restartable_redis):
    app = create_app(settings.replace(redis_url=restartable_redis.url))
    client = app.test_client()
    path = image_path(upstream, PHOTO, w=200)
    assert client.get(path).headers["X-Cache"] == "MISS"
    assert client.get(path).headers["X-Cache"] == "HIT"
    assert client.get("/healthz").status_code == 200

    restartable_redis.stop()
    down = client.get(path)
    assert down.status_code == 200
    assert down.headers["X-Cache"] == "BYPASS"
    health = client.get("/healthz")
    assert health.status_code == 503
    assert "redis" in health.json["error"]

    restartable_redis.start()  # empty: the first request renders, the next hits
    assert client.get("/healthz").status_code == 200
    assert client.get(path).headers["X-Cache"] == "MISS"
    assert client.get(path).headers["X-Cache"] == "HIT"


def test_output_too_large_to_cache_is_served_but_not_stored(settings, upstream, redis_client):
    app = create_app(settings.replace(max_cache_entry_bytes=1000))
    client = app.test_client()
    path = image_path(upstream, PHOTO, w=300)
    first, second = client.get(path), client.get(path)
    assert first.status_code == second.status_code == 200
    assert len(first.get_data()) > 1000
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "MISS")
    assert not list(redis_client.scan_iter("ip:*:v:*"))


def test_embedded_redis_runs_as_an_lru_cache_with_a_memory_cap(redis_server):
    import redis as redis_module

    config = redis_module.Redis.from_url(redis_server.url).config_get("maxmemory*")
    assert config["maxmemory-policy"] == "allkeys-lru"
    assert int(config["maxmemory"]) > 0
    assert redis_module.Redis.from_url(redis_server.url).config_get("save")["save"] == ""


def test_a_waiter_gives_up_after_the_request_budget_with_a_503_and_retry_after(settings, upstream):
    # The holder is another instance with a longer budget (its fetch takes 4 s); this one's
    # budget is 1 s, so it must stop waiting at its own deadline.
    holder_app = create_app(settings.replace(request_budget=8.0, upstream_timeout=8.0))
    app = create_app(settings.replace(request_budget=1.0, upstream_timeout=8.0))
    path = image_path(upstream, f"slow-image/4/{PHOTO}", w=90)
    holder = threading.Thread(target=lambda: holder_app.test_client().get(path))
    holder.start()
    time.sleep(0.3)  # the holder now has the lock and is fetching
    started = time.monotonic()
    response = app.test_client().get(path)
    waited = time.monotonic() - started
    holder.join()
    assert response.status_code == 503
    assert response.headers["Retry-After"].isdigit()
    assert response.headers["Cache-Control"] == "no-store"
    assert "rendering" in response.json["error"]
    assert waited < 1.0 + 0.5, "the waiter stops at its own deadline"


def test_the_request_budget_bounds_the_fetch_of_a_holder_too(settings, upstream):
    app = create_app(settings.replace(request_budget=1.0, upstream_timeout=8.0))
    path = image_path(upstream, f"slow-image/4/{PHOTO}", w=90)
    started = time.monotonic()
    response = app.test_client().get(path)
    # The budget, not UPSTREAM_TIMEOUT, cut the fetch: a 503 to retry, never stored.
    assert response.status_code == 503 and response.headers["Retry-After"].isdigit()
    assert time.monotonic() - started < 1.0 + 0.5
    assert app.test_client().get(path).headers.get("X-Cache") != "HIT", "the 503 was not stored"


def test_a_switched_off_input_format_is_refused_without_a_redeploy_of_code(settings, upstream):
    app = create_app(settings.replace(input_formats=frozenset({"jpeg", "png", "gif", "webp"})))
    client = app.test_client()
    refused = client.get(image_path(upstream, "edge/still.avif"))
    assert refused.status_code == 400
    assert "IMAGE_PROXY_INPUT_FORMATS" in refused.json["error"]
    assert client.get(image_path(upstream, "edge/plain.bmp")).status_code == 400
    assert client.get(image_path(upstream, PHOTO, w=50)).status_code == 200


def test_a_render_that_fits_the_budget_only_without_its_own_body_is_a_400_at_once(settings, upstream, corpus):
    from app.memory import service_baseline
    from app.render import RenderOptions
    from app.render.estimate import estimate_peak

    body = (corpus / PHOTO).read_bytes()
    estimate = estimate_peak(body, RenderOptions(width=0, quality=75, format="webp"))
    # Room for the render alone, not for the render beside the fetched body it renders.
    budget = service_baseline(settings.workers, None) + estimate + len(body) // 2
    app = create_app(settings.replace(memory_budget=budget))
    started = time.monotonic()
    response = app.test_client().get(image_path(upstream, PHOTO))
    assert response.status_code == 400
    assert "IMAGE_PROXY_MEMORY_BUDGET" in response.json["error"]
    assert time.monotonic() - started < 5, "refused at once, not after waiting for room that never comes"
