"""The front page in a real headless Chromium against real gunicorn and a loopback upstream.

What the page shows is compared with what the proxy really sends (Content-Length of the same
URLs, fetched again from Python: they are cache hits, so the same bytes). Screenshots go to
test-artifacts/ (desktop 1280 px and phone 390 px wide) to be looked at.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests
from PIL import Image

from tests.chromium import Chromium, Page
from tests.conftest import Gunicorn, free_port, gunicorn_env

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
PHOTO = "photos/waterfall_1800x1200.jpg"  # 1800 x 1200: the width row ends at the source width
TIMES = "\u00d7"  # MULTIPLICATION SIGN: the page writes sizes as "640 <TIMES> 427"
SETTLED = "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state"
HOSTILE_URLS = [
    "javascript:alert(1)",
    '"><script>window.pwned=1</script>',
    'http://127.0.0.1:1/"><img src=x onerror="window.pwned=2">',
]

#: Everything the test reads back from the page, in one round trip.
READ_PAGE = """(() => {
  const card = (id) => {
    const root = document.getElementById(id);
    const fact = (name) => root.querySelector(`[data-fact="${name}"]`);
    const img = root.querySelector("img");
    return {src: img.src, naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight, complete: img.complete,
            bytes: fact("bytes").dataset.bytes, contentLength: fact("bytes").dataset.contentLength,
            bytesText: fact("bytes").textContent, dimensions: fact("dimensions").textContent,
            format: fact("format").textContent, saving: (fact("saving") || {}).textContent,
            percent: (fact("saving") || {dataset: {}}).dataset.percent};
  };
  const cells = [...document.querySelectorAll("#width-rows td")].map((td) => ({
    format: td.dataset.format, url: td.dataset.url, bytes: td.dataset.bytes, contentLength: td.dataset.contentLength,
    failed: td.classList.contains("failed"), text: td.textContent}));
  const rows = [...document.querySelectorAll("#width-rows th")].map((th) => th.textContent);
  return {original: card("original"), optimized: card("optimized"), cells, rows,
          imageUrl: document.getElementById("image-url").textContent,
          curl: document.getElementById("curl-command").textContent,
          srcset: document.getElementById("srcset-snippet").textContent,
          picture: document.getElementById("picture-snippet").textContent,
          status: document.getElementById("status").textContent,
          overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth};
})()"""

READ_INTEGRITY = """(() => ({
  pwned: typeof window.pwned,
  scripts: [...document.scripts].map((s) => s.src),
  images: document.images.length,
  heading: document.querySelector("h1").textContent,
  formFields: document.getElementById("try").elements.length,
  errorHidden: document.getElementById("error").hidden,
  status: document.querySelector("#error .error-status").textContent,
  reason: document.querySelector("#error .error-reason").textContent,
  url: document.querySelector("#error .error-url code").textContent,
}))()"""


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    # One gunicorn and one browser for the module: starting them is most of a test's time.
    port = free_port()
    env = gunicorn_env(bind=f"127.0.0.1:{port}", allow_networks="127.0.0.0/8")
    server = Gunicorn(env, port, tmp_path_factory.mktemp("gunicorn") / "gunicorn.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(chromium_binary, tmp_path_factory):
    browser = Chromium(chromium_binary, tmp_path_factory.mktemp("chromium") / "profile").start()
    yield browser
    browser.stop()


@pytest.fixture
def page(browser, service) -> Page:
    page = browser.pages[0] if browser.pages else browser.page()
    page.events.clear()
    page.navigate(service.base + "/")
    page.wait_for("document.body.dataset.ready === 'yes'")
    return page


def submit(page: Page, url: str, *, w: str = "640", q: str = "75", fmt: str = "webp") -> str:
    fields = json.dumps({"url": url, "w": w, "q": q, "format": fmt})
    page.evaluate(
        f"""(() => {{
          const form = document.getElementById("try");
          for (const [name, value] of Object.entries({fields})) form.elements[name].value = value;
          form.requestSubmit();
        }})()"""
    )
    return page.wait_for(SETTLED, timeout=50)


class Snippet(HTMLParser):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {name: value or "" for name, value in attrs}))

    def first(self, tag: str) -> dict[str, str]:
        return next(attrs for name, attrs in self.tags if name == tag)


def srcset_candidates(srcset: str) -> list[tuple[str, int]]:
    candidates = []
    for candidate in srcset.split(","):
        match = re.fullmatch(r"\s*(\S+)\s+([0-9]+)w\s*", candidate)
        assert match, f"not a 'URL Nw' srcset candidate: {candidate!r}"
        candidates.append((match.group(1), int(match.group(2))))
    return candidates


def proxy_get(url: str) -> requests.Response:
    response = requests.get(url, timeout=30)
    assert response.status_code == 200, (url, response.status_code, response.text[:200])
    return response


def console_errors(page: Page) -> list[str]:
    errors = []
    for event in page.events:
        if event["method"] == "Runtime.exceptionThrown":
            errors.append(json.dumps(event["params"])[:300])
        if event["method"] == "Log.entryAdded" and event["params"]["entry"]["level"] == "error":
            entry = event["params"]["entry"]
            errors.append(f"{entry['text']} {entry.get('url', '')}".strip())
        if event["method"] == "Runtime.consoleAPICalled" and event["params"]["type"] == "error":
            errors.append(json.dumps(event["params"]["args"])[:300])
    return errors


def test_page_shows_what_the_proxy_served_and_a_srcset_that_works(page, service, upstream, corpus):
    source_url = upstream.url(PHOTO)
    assert submit(page, source_url) == "done"
    shown = page.evaluate(READ_PAGE)

    # Both images decoded, at the sizes the proxy rendered.
    assert shown["optimized"]["complete"] and shown["original"]["complete"]
    assert (shown["optimized"]["naturalWidth"], shown["optimized"]["naturalHeight"]) == (640, 427)
    assert (shown["original"]["naturalWidth"], shown["original"]["naturalHeight"]) == (1800, 1200)
    assert urlsplit(shown["original"]["src"]).netloc == urlsplit(service.base).netloc  # nothing third-party

    # The optimized bytes are the Content-Length the proxy sends for that URL.
    assert shown["imageUrl"] == shown["optimized"]["src"]
    assert parse_qs(urlsplit(shown["imageUrl"]).query) == {
        "url": [source_url],
        "w": ["640"],
        "q": ["75"],
        "format": ["webp"],
    }
    served = proxy_get(shown["imageUrl"])
    assert served.headers["X-Cache"] == "HIT"  # the page's own request rendered it
    assert shown["optimized"]["bytes"] == served.headers["Content-Length"] == shown["optimized"]["contentLength"]
    assert f"{int(served.headers['Content-Length']):,} bytes" in shown["optimized"]["bytesText"]
    assert shown["optimized"]["dimensions"] == f"640 {TIMES} 427"
    assert shown["optimized"]["format"] == "WebP"

    # The original's numbers are the source's, via X-Source-*.
    source_bytes = (corpus / PHOTO).stat().st_size
    assert shown["original"]["bytes"] == served.headers["X-Source-Bytes"] == str(source_bytes)
    assert f"{source_bytes:,} bytes" in shown["original"]["bytesText"]
    assert shown["original"]["dimensions"] == f"1800 {TIMES} 1200"
    assert shown["original"]["format"] == "JPEG"
    saving = (1 - int(served.headers["Content-Length"]) / source_bytes) * 100
    assert shown["optimized"]["percent"] == f"{saving:.1f}"
    assert shown["optimized"]["saving"] == f"{saving:.1f} % smaller"
    assert shown["curl"] == f"curl -o image.webp '{shown['imageUrl']}'"

    # The width row: the usual widths below 1800, then the source width itself (w=0).
    assert shown["rows"] == ["320", "640", "960", "1280", "1800 (source)"]
    assert len(shown["cells"]) == 10 and not [c for c in shown["cells"] if c["failed"]]
    for cell in shown["cells"]:
        again = proxy_get(cell["url"])
        assert again.headers["Content-Type"] == f"image/{cell['format']}"
        assert cell["bytes"] == cell["contentLength"] == again.headers["Content-Length"], cell["url"]

    # The <img srcset> snippet parses, names its widths truly, and every URL answers 200.
    img = Snippet(shown["srcset"]).first("img")
    assert img["sizes"] and img["width"] == "1800" and img["height"] == "1200"
    webp = srcset_candidates(img["srcset"])
    assert [width for _, width in webp] == [320, 640, 960, 1280, 1800]
    for url, width in [*webp, (img["src"], 960)]:
        response = proxy_get(url)
        assert response.headers["Content-Type"] == "image/webp"
        with Image.open(BytesIO(response.content)) as decoded:
            assert decoded.width == width, url

    picture = Snippet(shown["picture"])
    source = picture.first("source")
    assert source["type"] == "image/avif" and source["sizes"] == img["sizes"]
    avif = srcset_candidates(source["srcset"])
    assert [width for _, width in avif] == [320, 640, 960, 1280, 1800]
    for url, _ in avif:
        assert proxy_get(url).headers["Content-Type"] == "image/avif"
    assert srcset_candidates(picture.first("img")["srcset"]) == webp

    # The browser itself accepts the snippet: an <img> with its srcset and sizes loads a candidate.
    chosen = page.evaluate(
        f"""new Promise((resolve) => {{
          const img = document.createElement("img");
          img.sizes = {json.dumps(img["sizes"])};
          img.srcset = {json.dumps(img["srcset"])};
          img.onload = () => resolve({{width: img.naturalWidth, src: img.currentSrc}});
          img.onerror = () => resolve(null);
          document.body.append(img);
        }})"""
    )
    # (naturalWidth of a srcset image is density-corrected to the sizes slot, so only > 0 is asserted.)
    assert chosen and chosen["src"] in dict(webp) and chosen["width"] > 0
    page.evaluate("document.body.lastElementChild.remove()")

    assert console_errors(page) == []
    page.screenshot(ARTIFACTS / "front-page-desktop.png", width=1280)
    page.screenshot(ARTIFACTS / "front-page-phone.png", width=390, mobile=True)
    assert page.evaluate(READ_PAGE)["overflow"] <= 0  # nothing wider than a phone screen


def test_format_auto_counts_the_bytes_a_browser_that_accepts_avif_gets(page, upstream):
    assert submit(page, upstream.url(PHOTO), w="320", fmt="auto") == "done"
    shown = page.evaluate(READ_PAGE)
    assert shown["optimized"]["format"] == "AVIF (auto)"
    assert shown["optimized"]["complete"] and shown["optimized"]["naturalWidth"] == 320
    served = requests.get(shown["imageUrl"], headers={"Accept": "image/avif,image/webp,*/*"}, timeout=30)
    assert served.headers["Content-Type"] == "image/avif" and served.headers["Vary"] == "Accept"
    assert shown["optimized"]["bytes"] == served.headers["Content-Length"]
    assert "-H 'Accept: image/avif,image/webp'" in shown["curl"]
    assert console_errors(page) == []


def test_q_auto_is_offered_and_requested(page, upstream):
    assert page.evaluate("[...document.querySelectorAll('#qualities option')].map((o) => o.value)")[0] == "auto"
    assert submit(page, upstream.url(PHOTO), w="320", q="auto") == "done"
    shown = page.evaluate(READ_PAGE)
    assert "q=auto" in shown["imageUrl"] and shown["optimized"]["naturalWidth"] == 320
    served = requests.get(shown["imageUrl"], timeout=30)
    assert served.status_code == 200 and shown["optimized"]["bytes"] == served.headers["Content-Length"]
    assert console_errors(page) == []


@pytest.mark.parametrize("hostile", HOSTILE_URLS, ids=["javascript-scheme", "script-markup", "img-onerror"])
def test_hostile_urls_run_no_script_and_leave_the_page_intact(page, service, hostile):
    assert submit(page, hostile) == "error"
    typed = page.evaluate(READ_INTEGRITY)
    page.navigate(service.base + "/?" + urlencode({"url": hostile}))  # the shareable form of the same request
    assert page.wait_for(SETTLED) == "error"
    linked = page.evaluate(READ_INTEGRITY)

    expected_url = f"{service.base}/image?" + urlencode({"url": hostile, "w": "640", "q": "75", "format": "webp"})
    refusal = requests.get(expected_url, timeout=10)
    assert refusal.status_code in (400, 502)
    for integrity in (typed, linked):
        assert integrity["pwned"] == "undefined"
        assert integrity["scripts"] == [f"{service.base}/front/static/front.js"]
        assert integrity["images"] == 2  # the two cards' own <img>; nothing injected
        assert integrity["heading"] == "image-proxy" and integrity["formFields"] == 5
        assert not integrity["errorHidden"]
        assert integrity["status"].startswith(str(refusal.status_code))
        assert integrity["reason"] == refusal.json()["error"]
        assert integrity["url"] == expected_url
    assert "Page.javascriptDialogOpening" not in page.event_names()
    if hostile == HOSTILE_URLS[1]:
        page.screenshot(ARTIFACTS / "front-page-error-desktop.png", width=1280)
