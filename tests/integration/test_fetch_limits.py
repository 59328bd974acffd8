"""The fetch deadline and byte cap, against a real misbehaving loopback upstream."""

from __future__ import annotations

import time
from urllib.parse import quote

import pytest

from app.factory import create_app


@pytest.fixture
def short_client(settings):
    app = create_app(settings.replace(upstream_timeout=1.5, max_source_bytes=1024 * 1024))
    yield app.test_client()
    app.extensions["image_proxy"].fetcher.close()


def get(client, url: str):
    return client.get(f"/image?url={quote(url, safe='')}")


def test_trickling_upstream_gets_a_504_at_the_deadline(short_client, upstream):
    started = time.monotonic()
    # 200 bytes at one byte every 0.1 s would take 20 s: every read is fast, the whole is not.
    response = get(short_client, upstream.url("trickle?bytes=200&every=0.1"))
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert "1.5" in response.json["error"]
    assert elapsed < 1.5 + 1.0, f"the deadline stretched to {elapsed:.2f} s"


def test_upstream_slow_to_send_headers_gets_a_504(short_client, upstream):
    response = get(short_client, upstream.url("slow-image/3/photos/waterfall_1800x1200.jpg"))
    assert response.status_code == 504


def test_endless_body_is_cut_at_the_byte_cap(short_client, upstream):
    response = get(short_client, upstream.url("endless"))
    assert response.status_code == 400
    assert "limit" in response.json["error"]


def test_declared_length_over_the_cap_is_refused_before_reading(short_client, upstream):
    response = get(short_client, upstream.url("declared-large"))
    assert response.status_code == 400
    assert "limit" in response.json["error"]


def test_body_under_the_cap_is_fetched(short_client, upstream):
    response = get(short_client, upstream.url("photos/waterfall_1800x1200.jpg"))  # 0.4 MB
    assert response.status_code == 200


def test_redirects_are_followed_up_to_five(client, upstream):
    source = quote(upstream.url("redirect/5/photos/waterfall_1800x1200.jpg"), safe="")
    response = client.get(f"/image?url={source}&w=50")
    assert response.status_code == 200


def test_a_sixth_redirect_is_refused(client, upstream):
    response = client.get(f"/image?url={quote(upstream.url('redirect/6/photos/waterfall_1800x1200.jpg'), safe='')}")
    assert response.status_code == 502
    assert "redirect" in response.json["error"]
    assert upstream.hits["/photos/waterfall_1800x1200.jpg"] == 0


def test_a_gzip_encoded_body_sent_unasked_is_decoded(client, upstream):
    response = client.get(f"/image?url={quote(upstream.url('gzip/photos/waterfall_1800x1200.jpg'), safe='')}&w=60")
    assert response.status_code == 200
    assert upstream.headers_seen[0]["Accept-Encoding"] == "identity"
