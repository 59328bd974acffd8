"""/image through the Flask client, a real redis-server and a real loopback upstream."""

from __future__ import annotations

import io
from urllib.parse import quote

import pillow_avif  # noqa: F401
import pytest
from PIL import Image

PHOTO = "photos/waterfall_1800x1200.jpg"


def image_url(upstream, path: str = PHOTO, **params: object) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"/image?url={quote(upstream.url(path), safe='')}" + (f"&{query}" if query else "")


def decode(body: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(body))
    image.load()
    return image


BAD_PARAMETERS = [
    ("", "url"),
    ("url=", "url"),
    ("url=/relative/path.jpg", "url"),
    ("url=photo.jpg", "url"),
    ("url=ftp%3A%2F%2Fexample.com%2Fa.jpg", "url"),
    ("url=javascript%3Aalert(1)", "url"),
    ("url=file%3A%2F%2F%2Fetc%2Fpasswd", "url"),
    ("url=http%3A%2F%2F", "url"),
    ("url=http%3A%2F%2Fexa%20mple.com%2Fa.jpg", "url"),
    ("url=http%3A%2F%2Fexample.com%3A99999%2Fa.jpg", "url"),
    ("url=http%3A%2F%2Fexample.com%2F" + "a" * 2100, "url"),
    ("url={u}&url={u}", "url"),
    ("url={u}&w=abc", "w"),
    ("url={u}&w=-1", "w"),
    ("url={u}&w=%2B5", "w"),
    ("url={u}&w=5.0", "w"),
    ("url={u}&w=1e3", "w"),
    ("url={u}&w=1_000", "w"),
    ("url={u}&w=%205", "w"),
    ("url={u}&w=0x10", "w"),
    ("url={u}&w=", "w"),
    ("url={u}&w=8193", "w"),
    ("url={u}&w=99999999999999999999999", "w"),
    ("url={u}&w=640&w=320", "w"),
    ("url={u}&q=0", "q"),
    ("url={u}&q=101", "q"),
    ("url={u}&q=", "q"),
    ("url={u}&q=7.5", "q"),
    ("url={u}&q=%EF%BC%95", "q"),  # a full-width digit five: not a plain digit
    ("url={u}&q=Auto", "q"),  # auto is lower case only, like format=auto
    ("url={u}&q=auto5", "q"),
    ("url={u}&q=auto&q=75", "q"),
    ("url={u}&format=gif", "format"),
    ("url={u}&format=WEBP", "format"),
    ("url={u}&format=", "format"),
    ("url={u}&format=webp&format=avif", "format"),
]


@pytest.mark.parametrize(("query", "param"), BAD_PARAMETERS, ids=[q[:40] for q, _ in BAD_PARAMETERS])
def test_malformed_parameter_is_a_400_naming_it(client, upstream, query, param):
    source = quote(upstream.url(PHOTO), safe="")
    response = client.get("/image?" + query.format(u=source))
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.content_type == "application/json"
    assert response.json["error"].startswith(param + ":") or param in response.json["error"]
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert upstream.hits == {}, "a bad request must not reach the upstream"


def test_success_headers_follow_the_contract(client, upstream):
    response = client.get(image_url(upstream, w=640))
    assert response.status_code == 200
    body = response.get_data()
    assert response.headers["Content-Type"] == "image/webp"
    assert int(response.headers["Content-Length"]) == len(body)
    assert response.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert response.headers["ETag"].startswith('"') and response.headers["ETag"].endswith('"')
    assert response.headers["X-Cache"] == "MISS"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
    assert response.headers["Content-Disposition"] == 'inline; filename="waterfall_1800x1200.webp"'
    assert "Vary" not in response.headers
    assert body[:4] == b"RIFF" and body[8:12] == b"WEBP"


def test_second_request_is_a_hit_with_the_same_bytes_and_etag(client, upstream):
    first = client.get(image_url(upstream, w=320))
    second = client.get(image_url(upstream, w=320))
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert first.get_data() == second.get_data()
    assert first.headers["ETag"] == second.headers["ETag"]
    assert upstream.hits["/" + PHOTO] == 1


def test_unknown_parameters_are_ignored_and_not_part_of_the_key(client, upstream):
    first = client.get(image_url(upstream, w=320))
    second = client.get(image_url(upstream, w=320, utm_source="mail", x=""))
    assert second.status_code == 200
    assert second.headers["X-Cache"] == "HIT"
    assert first.headers["ETag"] == second.headers["ETag"]


def test_default_parameters_and_explicit_defaults_share_one_entry(client, upstream):
    client.get(image_url(upstream))
    response = client.get(image_url(upstream, w=0, q=75, format="webp"))
    assert response.headers["X-Cache"] == "HIT"


@pytest.mark.parametrize("header", ['"{etag}"', 'W/"{etag}"', '"nope", "{etag}"', "*"])
def test_if_none_match_gives_304_without_body(client, upstream, header):
    etag = client.get(image_url(upstream, w=200)).headers["ETag"].strip('"')
    response = client.get(image_url(upstream, w=200), headers={"If-None-Match": header.format(etag=etag)})
    assert response.status_code == 304
    assert response.get_data() == b""
    assert response.headers["ETag"] == f'"{etag}"'
    assert response.headers["Cache-Control"] == "public, max-age=31536000, immutable"


def test_if_none_match_with_another_etag_gives_the_image(client, upstream):
    response = client.get(image_url(upstream, w=200), headers={"If-None-Match": '"something-else"'})
    assert response.status_code == 200
    assert len(response.get_data()) > 0


def test_head_has_the_headers_of_get_and_no_body(client, upstream):
    get = client.get(image_url(upstream, w=300))
    head = client.head(image_url(upstream, w=300))
    assert head.status_code == 200
    assert head.get_data() == b""
    assert head.headers["Content-Length"] == get.headers["Content-Length"]
    assert head.headers["ETag"] == get.headers["ETag"]
    assert head.headers["Content-Type"] == "image/webp"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_405_with_allow_and_json(client, upstream, method):
    response = client.open(image_url(upstream), method=method)
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, HEAD"
    assert "error" in response.json
    assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("fmt", ["webp", "avif"])
def test_output_has_the_requested_format_and_width(client, upstream, fmt):
    response = client.get(image_url(upstream, w=640, format=fmt))
    assert response.status_code == 200
    image = decode(response.get_data())
    assert image.format == fmt.upper()
    assert response.headers["Content-Type"] == f"image/{fmt}"
    assert image.size == (640, 427)


def test_w_larger_than_source_is_not_enlarged(client, upstream):
    image = decode(client.get(image_url(upstream, w=5000)).get_data())
    assert image.size == (1800, 1200)


def test_w_zero_keeps_the_source_width(client, upstream):
    image = decode(client.get(image_url(upstream, w=0)).get_data())
    assert image.size == (1800, 1200)


@pytest.mark.parametrize("fmt", ["webp", "avif"])
def test_exif_orientation_6_photo_comes_out_upright(client, upstream, fmt):
    response = client.get(image_url(upstream, "photos/cardbox_exif6_1836x3264.jpg", w=400, format=fmt))
    image = decode(response.get_data())
    assert image.size == (400, 711), "portrait: width 400, height 3264*400/1836"
    assert "exif" not in image.info or not image.info["exif"]


def test_type_is_sniffed_from_the_bytes_not_the_name_or_content_type(client, upstream):
    assert client.get(image_url(upstream, "edge/jpeg_named.png")).status_code == 200
    response = client.get(image_url(upstream, "edge/page.html"))
    assert response.status_code == 400
    assert b"<html" not in response.get_data().lower()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("status/404", 404),
        ("status/410", 404),
        ("status/500", 502),
        ("status/503", 502),
        ("status/403", 502),
        ("status/204", 502),
        ("short", 502),
        ("declared-large", 400),
    ],
)
def test_upstream_failures_map_to_the_status_table(client, upstream, path, status):
    response = client.get(image_url(upstream, path))
    assert response.status_code == status
    assert response.json["error"]
    assert response.headers["Cache-Control"] == "no-store"


def test_unreachable_upstream_is_a_502(client):
    from tests.conftest import free_port

    port = free_port()  # nothing listens there
    response = client.get(f"/image?url=http%3A%2F%2F127.0.0.1%3A{port}%2Fa.jpg")
    assert response.status_code == 502
    assert "connect" in response.json["error"]


def test_upstream_caching_headers_are_ignored(client, upstream):
    # The corpus route answers with Cache-Control: no-cache and a Set-Cookie.
    response = client.get(image_url(upstream, w=100))
    assert response.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert "Set-Cookie" not in response.headers


def test_nothing_from_the_client_is_forwarded_upstream(client, upstream):
    client.get(
        image_url(upstream, w=120),
        headers={"Cookie": "session=secret", "Authorization": "Bearer secret", "X-Private": "secret",
                 "Referer": "https://private.example/"},
    )
    (seen,) = upstream.headers_seen
    lowered = {k.lower(): v for k, v in seen.items()}
    assert not {"cookie", "authorization", "x-private", "referer"} & set(lowered)
    assert lowered["via"] == "1.1 image-proxy"
    assert lowered["user-agent"].startswith("image-proxy/")
    assert "secret" not in repr(seen)


@pytest.mark.parametrize("path", [PHOTO, "status/404", "edge/random.bin"])
def test_no_header_is_sent_twice(client, upstream, path):
    for response in (client.get(image_url(upstream, path, w=50)), client.get(image_url(upstream, path, w=50))):
        names = [name.lower() for name, _ in response.headers]
        assert len(names) == len(set(names)), names


@pytest.mark.parametrize("fmt", ["webp", "auto"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_the_fresh_hit_path_answers_exactly_as_the_flask_view(client, upstream, fmt, method):
    """A fresh hit is answered by app/image/fresh_hits.py without Flask; a conditional request
    that does not match goes through the blueprint. Both must give the same answer."""
    path = f"/image?url={quote(upstream.url('photos/portrait_1200x1800.jpg'), safe='')}&w=120&format={fmt}"
    assert client.get(path, headers={"Accept": "image/avif"}).status_code == 200  # now cached
    fast = client.open(path, method=method, headers={"Accept": "image/avif"})
    flask_path = client.open(path, method=method, headers={"Accept": "image/avif", "If-None-Match": '"other"'})
    assert fast.status_code == flask_path.status_code == 200
    assert fast.headers["X-Cache"] == flask_path.headers["X-Cache"] == "HIT"
    assert sorted(fast.headers.items()) == sorted(flask_path.headers.items())
    assert fast.get_data() == flask_path.get_data()
    assert (len(fast.get_data()) > 0) == (method == "GET")


def test_a_stored_failure_is_answered_with_its_status_on_every_hit(client, upstream):
    path = f"/image?url={quote(upstream.url('status/404'), safe='')}"
    first, second = client.get(path), client.get(path)
    assert (first.status_code, second.status_code) == (404, 404)
    assert second.headers["X-Cache"] == "HIT"
    assert second.headers["Cache-Control"] == "no-store" and second.json["error"]


def test_q_auto_is_its_own_cache_entry_and_a_valid_image(client, upstream):
    auto = client.get(image_url(upstream, w=320, q="auto", format="webp"))
    assert auto.status_code == 200, auto.get_data(as_text=True)
    assert decode(auto.data).size == (320, 213)
    assert auto.headers["X-Cache"] == "MISS"
    assert 1 <= int(auto.headers["X-Quality"]) <= 100
    hit = client.get(image_url(upstream, w=320, q="auto", format="webp"))
    assert hit.headers["X-Cache"] == "HIT"
    assert hit.headers["X-Quality"] == auto.headers["X-Quality"], "a hit says what the miss chose"
    fixed = client.get(image_url(upstream, w=320, q=75, format="webp"))
    assert fixed.headers["X-Cache"] == "MISS"  # q=auto and q=75 never share an entry
    assert "X-Quality" not in fixed.headers  # a fixed q is in the URL already
