"""The front page through the Flask client: its headers, its switch, its config, and the
X-Source-* headers of /image that it reads the original's bytes and size from."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlencode

import pytest
from PIL import Image

from app.factory import create_app
from app.front.views import PAGE_CSP, RESPONSIVE_WIDTHS, STATIC

PHOTO = "photos/waterfall_1800x1200.jpg"
ROTATED = "photos/cardbox_exif6_1836x3264.jpg"  # stored 3264 x 1836, EXIF orientation 6


def image_path(upstream, path: str, **params: str) -> str:
    return "/image?" + urlencode({"url": upstream.url(path), **params})


@pytest.fixture
def app_with(settings):
    made = []

    def make(**changes):
        application = create_app(settings.replace(**changes))
        application.config.update(TESTING=True)
        made.append(application)
        return application.test_client()

    yield make
    for application in made:
        application.extensions["image_proxy"].fetcher.close()


def test_front_page_is_served_with_a_strict_csp_and_nosniff(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    assert response.headers["Content-Security-Policy"] == PAGE_CSP
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert "unsafe" not in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert b'<script src="/front/static/front.js"' in response.data


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_front_page_html_has_no_inline_script_handler_or_style():
    markup = _Markup()
    markup.feed((STATIC / "index.html").read_text())
    scripts = [attrs for tag, attrs in markup.tags if tag == "script"]
    assert scripts == [{"src": "/front/static/front.js", "defer": None}]
    assert not [tag for tag, _ in markup.tags if tag == "style"]
    for tag, attrs in markup.tags:
        assert not [name for name in attrs if name.startswith("on") or name == "style"], tag


def test_front_script_never_uses_inner_html_or_eval():
    lines = (STATIC / "front.js").read_text().splitlines()
    script = "\n".join(line for line in lines if not line.lstrip().startswith("//"))  # code, not its comments
    for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert forbidden not in script, forbidden


@pytest.mark.parametrize(
    ("path", "mimetype"),
    [("/front/static/front.js", "text/javascript"), ("/front/static/front.css", "text/css")],
    ids=["script", "stylesheet"],
)
def test_static_files_are_served_with_their_types_and_the_csp(client, path, mimetype):
    with client.get(path) as response:
        assert response.status_code == 200
        body = response.get_data()
    assert body
    assert response.mimetype == mimetype
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Security-Policy"] == PAGE_CSP


def test_static_files_are_package_data():
    setup_cfg = (Path(__file__).resolve().parents[2] / "setup.cfg").read_text()
    assert "front/static/*" in setup_cfg
    assert {p.name for p in STATIC.iterdir()} >= {"index.html", "front.css", "front.js"}


def test_front_page_switched_off_is_a_json_404(app_with):
    client = app_with(front_page=False)
    for path in ("/", "/front/static/front.js", "/front/config.json"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.is_json and "error" in response.json, path
    assert client.get("/healthz").status_code == 200


def test_config_lists_the_usual_widths_up_to_max_width(app_with):
    body = app_with(max_width=1000).get("/front/config.json").json
    assert body["widths"] == [w for w in RESPONSIVE_WIDTHS if w <= 1000]
    assert body["max_width"] == 1000
    assert body["allowed_widths"] == []
    assert body["default_quality"] == 75


def test_config_offers_only_allowed_widths_when_they_are_set(app_with):
    body = app_with(allowed_widths=(800, 200, 400)).get("/front/config.json").json
    assert body["widths"] == [200, 400, 800]
    assert body["allowed_widths"] == [800, 200, 400]


def test_image_responses_name_the_source_bytes_size_and_format(client, upstream, corpus):
    source = corpus / PHOTO
    for expected_cache in ("MISS", "HIT"):
        response = client.get(image_path(upstream, PHOTO, w="320"))
        assert response.status_code == 200
        assert response.headers["X-Cache"] == expected_cache
        assert response.headers["X-Source-Bytes"] == str(source.stat().st_size)
        assert (response.headers["X-Source-Width"], response.headers["X-Source-Height"]) == ("1800", "1200")
        assert response.headers["X-Source-Format"] == "jpeg"
        exposed = {h.strip() for h in response.headers["Access-Control-Expose-Headers"].split(",")}
        assert exposed >= {"X-Source-Bytes", "X-Source-Width", "X-Source-Height", "X-Source-Format"}
    with Image.open(source) as image:
        assert image.size == (1800, 1200)


def test_source_size_is_upright_like_the_rendered_image(client, upstream):
    response = client.get(image_path(upstream, ROTATED, w="100"))
    assert response.status_code == 200
    assert (response.headers["X-Source-Width"], response.headers["X-Source-Height"]) == ("1836", "3264")


def test_revalidation_keeps_the_source_headers(client, upstream):
    first = client.get(image_path(upstream, PHOTO, w="160"))
    again = client.get(image_path(upstream, PHOTO, w="160"), headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304
    assert again.headers["X-Source-Bytes"] == first.headers["X-Source-Bytes"]


@pytest.mark.parametrize(
    ("url", "status"),
    [
        ("http://10.0.0.1/a.jpg", 400),
        ("javascript:alert(1)", 400),
        ('"><script>window.pwned=1</script>', 400),
    ],
    ids=["private-address", "javascript-scheme", "markup"],
)
def test_refusals_carry_no_source_headers(client, url, status):
    response = client.get("/image?" + urlencode({"url": url}))
    assert response.status_code == status
    assert response.is_json and response.json["error"]
    assert not any(name.startswith("X-Source-") for name, _ in response.headers.items())


def test_failures_from_upstream_carry_no_source_headers(client, upstream):
    response = client.get(image_path(upstream, "status/404"))
    assert response.status_code == 404
    assert "X-Source-Bytes" not in response.headers
