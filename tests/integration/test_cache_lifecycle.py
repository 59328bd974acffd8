"""Cache lifecycle (SPEC §10) against a real redis-server and the loopback upstream: source
reuse, revalidation (304 renews without a render), stale-if-error, a changed source, warm,
purge and the admin token. CACHE_TTL is one second here, so freshness ends within a test."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest

from app import create_app, metrics
from app.cache import CacheKey
from app.guard import parse_source_url
from app.image.params import source_digest
from app.settings import Settings, SettingsError

PHOTO = "photos/portrait_1200x1800.jpg"
OTHER = "photos/waterfall_1800x1200.jpg"
TOKEN = "t0ken-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def image_path(upstream, path: str, **params: object) -> str:
    extra = "".join(f"&{k}={v}" for k, v in params.items())
    return f"/image?url={quote(upstream.url(path), safe='')}{extra}"


def renders() -> float:
    """Renders counted so far in this process (the render histogram's observations)."""
    return sum(sample.value for family in metrics.RENDER_SECONDS.collect() for sample in family.samples
               if sample.name.endswith("_count"))


@pytest.fixture
def lifecycle_app(settings: Settings):
    app = create_app(settings.replace(cache_ttl=1, stale_ttl=30, admin_token=TOKEN))
    yield app
    app.extensions["image_proxy"].fetcher.close()


def source_keys(redis_client, url: str) -> list[bytes]:
    digest = source_digest(parse_source_url(url))
    return sorted([*redis_client.scan_iter(match=f"ip:{{{digest}}}:v:*"), *redis_client.keys(f"ip:{{{digest}}}:src")])


def test_ten_concurrent_variants_of_one_cold_source_cost_one_download(lifecycle_app, upstream):
    path = f"validated/{PHOTO}"
    variants = [(w, f) for w in (100, 200, 300, 400, 500) for f in ("webp", "avif")]
    barrier = threading.Barrier(len(variants))
    before = renders()

    def one(variant: tuple[int, str]) -> tuple[int, str]:
        client = lifecycle_app.test_client()
        barrier.wait()
        response = client.get(image_path(upstream, path, w=variant[0], format=variant[1]))
        return response.status_code, response.headers["X-Cache"]

    with ThreadPoolExecutor(len(variants)) as pool:
        results = list(pool.map(one, variants))
    assert results == [(200, "MISS")] * 10
    assert upstream.bodies[PHOTO] == 1, "one upstream fetch for the whole family"
    assert renders() - before == 10, "one render per variant"


def test_a_304_renews_every_variant_without_a_body_fetch_or_render(lifecycle_app, upstream):
    client = lifecycle_app.test_client()
    path = f"validated/{PHOTO}"
    first = client.get(image_path(upstream, path, w=120))
    other = client.get(image_path(upstream, path, w=140))
    assert (first.headers["X-Cache"], other.headers["X-Cache"]) == ("MISS", "MISS")
    time.sleep(1.2)  # CACHE_TTL is 1 s: both variants are past their freshness
    before = renders()
    renewed = client.get(image_path(upstream, path, w=120))
    assert renewed.status_code == 200 and renewed.headers["X-Cache"] == "HIT"
    assert renewed.get_data() == first.get_data() and renewed.headers["ETag"] == first.headers["ETag"]
    assert (upstream.conditional[PHOTO], upstream.not_modified[PHOTO], upstream.bodies[PHOTO]) == (1, 1, 1)
    # The other variant was renewed by the same 304: no request of its own reaches the upstream.
    again = client.get(image_path(upstream, path, w=140))
    assert again.headers["X-Cache"] == "HIT" and again.get_data() == other.get_data()
    assert upstream.conditional[PHOTO] == 1
    assert renders() == before, "a 304 renders nothing"


@pytest.mark.parametrize("failure", [503, "refuse"], ids=["503", "refused"])
def test_upstream_down_after_expiry_serves_the_stale_entry(lifecycle_app, upstream, failure):
    client = lifecycle_app.test_client()
    path = f"validated/{PHOTO}"
    first = client.get(image_path(upstream, path, w=160))
    upstream.failing[PHOTO] = failure
    time.sleep(1.2)
    stale = client.get(image_path(upstream, path, w=160))
    assert stale.status_code == 200 and stale.headers["X-Cache"] == "STALE"
    assert stale.get_data() == first.get_data() and stale.headers["ETag"] == first.headers["ETag"]
    # The failure is remembered briefly: the next stale answer does not ask again.
    asked = upstream.hits[f"/validated/{PHOTO}"]
    assert client.get(image_path(upstream, path, w=160)).headers["X-Cache"] == "STALE"
    assert upstream.hits[f"/validated/{PHOTO}"] == asked
    # Back up: the next revalidation (after the failure marker) renews it.
    del upstream.failing[PHOTO]
    marker = CacheKey(source_digest(parse_source_url(upstream.url(path))), "").failing
    lifecycle_app.extensions["image_proxy"].cache.client.delete(marker)
    assert client.get(image_path(upstream, path, w=160)).headers["X-Cache"] == "HIT"


def test_a_failed_revalidation_never_extends_the_stale_window(settings, upstream):
    app = create_app(settings.replace(cache_ttl=1, stale_ttl=1, error_ttl=0))
    client = app.test_client()
    path = f"validated/{PHOTO}"
    assert client.get(image_path(upstream, path, w=180)).status_code == 200
    upstream.failing[PHOTO] = 503
    time.sleep(1.2)
    assert client.get(image_path(upstream, path, w=180)).headers["X-Cache"] == "STALE"
    time.sleep(1.0)  # past fresh + stale: the error is answered
    late = client.get(image_path(upstream, path, w=180))
    assert late.status_code == 502 and late.headers["Cache-Control"] == "no-store"


def test_a_deleted_source_stops_being_served(lifecycle_app, upstream):
    client = lifecycle_app.test_client()
    path = f"validated/{PHOTO}"
    assert client.get(image_path(upstream, path, w=200)).status_code == 200
    upstream.failing[PHOTO] = 404
    time.sleep(1.2)
    gone = client.get(image_path(upstream, path, w=200))
    assert gone.status_code == 404 and gone.json["error"]


@pytest.mark.parametrize("status", [403, 451])
def test_an_upstream_that_answers_no_is_answered_not_served_stale(lifecycle_app, upstream, status):
    # SPEC §10: a stale copy stands in for an upstream that is down (5xx, refused, timed out),
    # not for one that is up and refuses (a takedown must stop the image being served).
    client = lifecycle_app.test_client()
    path = f"validated/{PHOTO}"
    assert client.get(image_path(upstream, path, w=210)).status_code == 200
    upstream.failing[PHOTO] = status
    time.sleep(1.2)
    refused = client.get(image_path(upstream, path, w=210))
    assert refused.status_code == 502 and refused.headers.get("X-Cache") != "STALE"
    assert refused.json["error"] == f"upstream answered {status}"


def test_a_changed_source_is_rendered_again_with_new_bytes_and_etag(lifecycle_app, upstream):
    client = lifecycle_app.test_client()
    path = f"validated/{PHOTO}"
    first = client.get(image_path(upstream, path, w=220))
    upstream.replaced[PHOTO] = OTHER
    time.sleep(1.2)
    changed = client.get(image_path(upstream, path, w=220))
    assert changed.status_code == 200 and changed.headers["X-Cache"] == "MISS"
    assert changed.headers["ETag"] != first.headers["ETag"] and changed.get_data() != first.get_data()
    assert changed.headers["X-Source-Width"] == "1800"
    assert (upstream.conditional[PHOTO], upstream.bodies[PHOTO]) == (1, 2)
    assert client.get(image_path(upstream, path, w=220)).headers["X-Cache"] == "HIT"


def test_warm_renders_the_family_from_one_download_and_the_sizes_match_later_hits(lifecycle_app, upstream):
    client = lifecycle_app.test_client()
    url = upstream.url(f"validated/{PHOTO}")
    response = client.post("/admin/warm", headers=AUTH,
                           json={"url": url, "widths": [100, 200], "formats": ["webp", "avif"], "q": 60})
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    variants = response.json["variants"]
    assert [(v["w"], v["format"], v["status"]) for v in variants] == [
        (100, "webp", 200), (200, "webp", 200), (100, "avif", 200), (200, "avif", 200)]
    assert upstream.bodies[PHOTO] == 1
    for variant in variants:
        hit = client.get(f"/image?url={quote(url, safe='')}&w={variant['w']}&format={variant['format']}&q=60")
        assert hit.headers["X-Cache"] == "HIT"
        assert int(hit.headers["Content-Length"]) == variant["bytes"]


def test_warm_takes_q_auto_and_later_requests_hit_it(lifecycle_app, upstream):
    client = lifecycle_app.test_client()
    url = upstream.url(f"validated/{PHOTO}")
    response = client.post("/admin/warm", headers=AUTH, json={"url": url, "widths": [120], "q": "auto"})
    assert [(v["w"], v["status"]) for v in response.json["variants"]] == [(120, 200)]
    hit = client.get(f"/image?url={quote(url, safe='')}&w=120&q=auto")
    assert hit.headers["X-Cache"] == "HIT"
    assert client.post("/admin/warm", headers=AUTH, json={"url": url, "q": "Auto"}).status_code == 400


def test_purge_removes_every_variant_and_the_kept_source(lifecycle_app, upstream, redis_client):
    client = lifecycle_app.test_client()
    path = f"validated/{PHOTO}"
    for params in ({"w": 100}, {"w": 100, "format": "avif"}, {"w": 300, "q": 50}):
        assert client.get(image_path(upstream, path, **params)).status_code == 200
    url = upstream.url(path)
    assert len(source_keys(redis_client, url)) == 4, "three variants and the kept source"
    purged = client.post("/admin/purge", headers=AUTH, json={"url": url})
    assert purged.status_code == 200 and purged.json == {"purged": 4}
    assert source_keys(redis_client, url) == []
    assert client.post("/admin/purge", headers=AUTH, json={"url": url}).json == {"purged": 0}
    again = client.get(image_path(upstream, path, w=100))
    assert again.headers["X-Cache"] == "MISS" and upstream.bodies[PHOTO] == 2


def test_admin_is_a_404_without_a_token(app):
    assert app.test_client().post("/admin/purge", json={"url": "http://example.com/a.jpg"}).status_code == 404


@pytest.mark.parametrize("header", [
    None, f"Bearer {TOKEN[:-1]}", f"bearer {TOKEN}", f"Bearer {TOKEN} ", f"Basic {TOKEN}", TOKEN,
], ids=["missing", "wrong", "lowercase", "trailing-space", "basic", "bare"])
def test_anything_but_the_exact_bearer_token_is_a_json_401(lifecycle_app, header):
    headers = {"Authorization": header} if header is not None else {}
    response = lifecycle_app.test_client().post("/admin/purge", headers=headers, json={"url": "http://a.example/x"})
    assert response.status_code == 401
    assert response.json["error"] and response.headers["Cache-Control"] == "no-store"


def test_get_on_admin_is_not_served(lifecycle_app):
    for path in ("/admin/purge", "/admin/warm", "/admin/"):
        assert lifecycle_app.test_client().get(path, headers=AUTH).status_code in (404, 405)


def test_a_short_admin_token_stops_start_up():
    with pytest.raises(SettingsError, match="IMAGE_PROXY_ADMIN_TOKEN"):
        Settings.from_env({"IMAGE_PROXY_ADMIN_TOKEN": "short-token"})


def test_bad_admin_bodies_are_400s(lifecycle_app):
    client = lifecycle_app.test_client()
    assert client.post("/admin/purge", headers=AUTH, data="nope").status_code == 400
    assert client.post("/admin/purge", headers=AUTH, json={"url": "ftp://x/y"}).status_code == 400
    bad_widths = {"url": "http://a.example/x", "widths": "100"}
    assert client.post("/admin/warm", headers=AUTH, json=bad_widths).status_code == 400
