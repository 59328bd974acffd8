"""The shipped deploy/nginx.conf in front of real gunicorn, with real Debian nginx, over TLS
and HTTP/2 with a self-signed certificate the test makes (openssl)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from tests.conftest import ROOT, free_port
from tests.system_packages import ensure_binary

pytestmark = pytest.mark.e2e

#: The names the test's nginx answers to (the shipped server_name placeholder, replaced).
NAMES = "localhost 127.0.0.1"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, valid for a day."""
    openssl = ensure_binary("openssl", "openssl")
    cert, key = directory / "fullchain.pem", directory / "privkey.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


class Nginx:
    """nginx with deploy/nginx.conf: placeholders replaced, listeners moved to loopback ports
    (the IPv6 listen lines dropped), cache and temp files in the test's directory."""

    def __init__(self, binary: str, prefix: Path, proxy_port: int) -> None:
        self.port, self.http_port = free_port(), free_port()
        prefix.mkdir(parents=True, exist_ok=True)
        self.cert, key = make_certificate(prefix)
        site = (ROOT / "deploy" / "nginx.conf").read_text()
        replacements = {
            "server 127.0.0.1:8000;": f"server 127.0.0.1:{proxy_port};",
            "listen 443 ssl http2;": f"listen 127.0.0.1:{self.port} ssl http2;",
            "listen 443 ssl default_server;": f"listen 127.0.0.1:{self.port} ssl default_server;",
            "listen 80;": f"listen 127.0.0.1:{self.http_port};",
            "listen 80 default_server;": f"listen 127.0.0.1:{self.http_port} default_server;",
            "https://images.example.com$request_uri": f"https://localhost:{self.port}$request_uri",
            "server_name images.example.com;": f"server_name {NAMES};",
            "/etc/ssl/image-proxy/fullchain.pem": str(self.cert),
            "/etc/ssl/image-proxy/privkey.pem": str(key),
            "/var/cache/nginx/image-proxy": str(prefix / "cache"),
        }
        for old, new in replacements.items():
            assert old in site, f"deploy/nginx.conf changed shape: {old!r} is gone"
            site = site.replace(old, new)
        site = "\n".join(line for line in site.splitlines() if "listen [::]" not in line)
        directives = "\n".join(line.split("#", 1)[0] for line in site.splitlines())
        assert "example.com" not in directives and ":8000" not in directives, "a placeholder is left"
        (prefix / "site.conf").write_text(site)
        temp = "\n".join(f"  {name}_temp_path {prefix}/{name};" for name in ("client_body", "proxy", "fastcgi",
                                                                                "uwsgi", "scgi"))
        (prefix / "nginx.conf").write_text(
            ""
            # Workers would run as nobody, who cannot enter pytest's private temp directory.
            + ("user root;\n" if os.geteuid() == 0 else "")
            + f"worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\ndaemon off;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{\n  access_log off;\n{temp}\n  include {prefix}/site.conf;\n}}\n"
        )
        with open(prefix / "stderr.log", "wb") as stderr:
            self.process = subprocess.Popen(
                [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf")], stdout=subprocess.DEVNULL, stderr=stderr
            )
        self.prefix = prefix
        give_up = time.monotonic() + 15
        while time.monotonic() < give_up:
            if self.process.poll() is not None:
                raise RuntimeError((prefix / "stderr.log").read_text() + (prefix / "error.log").read_text())
            try:
                self.get("/healthz", timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("nginx did not start")

    @property
    def base(self) -> str:
        return f"https://localhost:{self.port}"

    def get(self, path_or_url: str, **kwargs) -> requests.Response:
        url = path_or_url if path_or_url.startswith("https://") else self.base + path_or_url
        kwargs.setdefault("timeout", 30)
        return requests.get(url, verify=str(self.cert), **kwargs)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def image_responses(tab) -> list[dict]:
    """The responses Chromium received for images (DevTools Network.responseReceived)."""
    return [
        event["params"]["response"]
        for event in tab.events
        if event.get("method") == "Network.responseReceived" and event["params"].get("type") == "Image"
    ]


@pytest.fixture
def nginx_binary() -> str:
    return ensure_binary("nginx", "nginx-light")


@pytest.fixture
def nginx_in_front(nginx_binary, start_gunicorn, tmp_path):
    server = start_gunicorn()
    edge = Nginx(nginx_binary, tmp_path / "nginx", server.port)
    yield edge, server
    edge.stop()


def test_images_through_nginx_keep_the_contract_and_hits_come_from_the_edge(nginx_in_front, upstream):
    edge, _ = nginx_in_front
    url = f"{edge.base}/image?url={quote(upstream.url('photos/saw_2725x2225.jpg'), safe='')}&w=320"
    first = edge.get(url)
    second = edge.get(url)
    assert first.status_code == second.status_code == 200
    assert first.headers["Content-Type"] == "image/webp"
    assert first.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert first.headers["ETag"] == second.headers["ETag"]
    assert first.headers["Access-Control-Allow-Origin"] == "*"
    assert first.headers["X-Content-Type-Options"] == "nosniff"
    assert first.headers["Content-Disposition"] == 'inline; filename="saw_2725x2225.webp"'
    assert first.headers["X-Edge-Cache"] == "MISS"
    assert second.headers["X-Edge-Cache"] == "HIT", "the second request is answered by nginx's cache"
    assert first.content == second.content
    assert int(first.headers["Content-Length"]) == len(first.content)
    revalidated = edge.get(url, headers={"If-None-Match": first.headers["ETag"]})
    assert revalidated.status_code == 304


def test_errors_pass_through_nginx_with_their_status_and_are_not_cached(nginx_in_front, upstream):
    edge, _ = nginx_in_front
    for path, status in (("status/404", 404), ("status/500", 502), ("edge/vector.svg", 400)):
        url = f"{edge.base}/image?url={quote(upstream.url(path), safe='')}"
        for _ in range(2):
            response = edge.get(url)
            assert response.status_code == status
            assert response.headers["Content-Type"] == "application/json"
            assert response.json()["error"]
            assert response.headers.get("X-Edge-Cache") != "HIT"
    bad = edge.get("/image?w=abc")
    assert bad.status_code == 400 and "url" in bad.json()["error"]


def test_format_auto_through_nginx_keeps_the_variants_apart(nginx_in_front, upstream):
    edge, _ = nginx_in_front
    url = f"{edge.base}/image?url={quote(upstream.url('photos/waterfall_1800x1200.jpg'), safe='')}&w=200&format=auto"
    avif = edge.get(url, headers={"Accept": "image/avif,image/webp,*/*"})
    webp = edge.get(url, headers={"Accept": "image/webp,*/*"})
    # Another browser's Accept string, same capability: the same edge copy, not a new one.
    avif_again = edge.get(url, headers={"Accept": "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"})
    webp_again = edge.get(url, headers={"Accept": "*/*"})
    assert avif.headers["Content-Type"] == avif_again.headers["Content-Type"] == "image/avif"
    assert webp.headers["Content-Type"] == webp_again.headers["Content-Type"] == "image/webp"
    assert [r.headers["X-Edge-Cache"] for r in (avif, webp, avif_again, webp_again)] == ["MISS", "MISS", "HIT", "HIT"]
    assert avif.headers["Vary"] == "Accept", "browsers and CDNs further out still see Vary"


def test_img_and_srcset_through_nginx_decode_in_chromium_and_auto_gives_avif(nginx_in_front, upstream, chromium):
    edge, _ = nginx_in_front
    source = quote(upstream.url("photos/paddleboat_3264x1836.jpg"), safe="")
    base = f"{edge.base}/image?url={source}"
    srcset = ", ".join(f"{base}&amp;w={w}&amp;format=auto {w}w" for w in (320, 640, 960, 1280))
    upstream.pages["img.html"] = (f"""<!doctype html><meta charset="utf-8"><title>proxy images</title>
<body style="margin:0">
<img id="webp" src="{base}&amp;w=300&amp;format=webp" width="300">
<img id="avif" src="{base}&amp;w=300&amp;format=avif" width="300">
<img id="auto" src="{base}&amp;w=301&amp;format=auto" width="301">
<img id="responsive" srcset="{srcset}" sizes="600px" width="600">
</body>""")
    tab = chromium.page()
    tab.send("Security.setIgnoreCertificateErrors", ignore=True)  # the test's self-signed certificate
    tab.send("Network.enable")
    tab.set_viewport(1280, 900)
    tab.navigate(upstream.url("page/img.html"))
    tab.wait_for("[...document.images].every(i => i.complete)", timeout=60)
    widths = tab.evaluate("Object.fromEntries([...document.images].map(i => [i.id, i.naturalWidth]))")
    # sizes=600px at DPR 1: the smallest candidate at least 600 px wide, the 640w one; its
    # naturalWidth is density-corrected (640 px at 640/600 density reads as 600).
    assert widths.pop("responsive") in (599, 600)
    assert widths == {"webp": 300, "avif": 300, "auto": 301}
    chosen = tab.evaluate("document.getElementById('responsive').currentSrc")
    assert "w=640" in chosen
    decoded = tab.evaluate(
        "fetch(document.getElementById('responsive').currentSrc).then(r => r.blob())"
        ".then(b => createImageBitmap(b)).then(i => i.width)"
    )
    assert decoded == 640
    types = {response["url"]: response["mimeType"] for response in image_responses(tab)}
    protocols = {response.get("protocol") for response in image_responses(tab)}
    assert protocols == {"h2"}, "Chromium loads the images over HTTP/2 (TLS + ALPN)"
    auto_types = {mime for url, mime in types.items() if "format=auto" in url}
    assert auto_types == {"image/avif"}, "Chromium's Accept names image/avif, so format=auto answers AVIF"
    assert types[f"{edge.base}/image?url={source}&w=300&format=avif"] == "image/avif"
    assert types[f"{edge.base}/image?url={source}&w=300&format=webp"] == "image/webp"
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    tab.screenshot(artifacts / "nginx-img-srcset.png", width=1280)



def test_http2_over_tls_with_curl_and_plain_http_only_redirects(nginx_in_front, upstream):
    edge, _ = nginx_in_front
    url = f"{edge.base}/image?url={quote(upstream.url('photos/portrait_1200x1800.jpg'), safe='')}&w=90"
    result = subprocess.run(
        ["curl", "--http2", "-sS", "--cacert", str(edge.cert), "-o", "/dev/null",
         "-w", "%{http_version} %{http_code} %{content_type}", url],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert result.stdout == "2 200 image/webp"
    plain = requests.get(f"http://127.0.0.1:{edge.http_port}/image?w=1", headers={"Host": "localhost"},
                         allow_redirects=False, timeout=10)
    assert plain.status_code == 301
    assert plain.headers["Location"] == f"https://localhost:{edge.port}/image?w=1"


def test_host_header_cannot_split_the_edge_cache_and_unknown_hosts_get_nothing(nginx_in_front, upstream):
    edge, _ = nginx_in_front
    path = f"/image?url={quote(upstream.url('photos/portrait_1200x1800.jpg'), safe='')}&w=70"
    first = edge.get(path, headers={"Host": "localhost"})
    second = edge.get(path, headers={"Host": "127.0.0.1"})  # another name of this server
    assert (first.headers["X-Edge-Cache"], second.headers["X-Edge-Cache"]) == ("MISS", "HIT")
    with pytest.raises(requests.ConnectionError):  # the catch-all server closes without a reply
        edge.get(path, headers={"Host": "attacker.example"})


def test_limit_req_answers_429_past_the_documented_burst(nginx_in_front, upstream):
    edge, _ = nginx_in_front
    url = f"{edge.base}/image?url={quote(upstream.url('photos/portrait_1200x1800.jpg'), safe='')}&w=50"
    statuses = []
    with requests.Session() as session:
        # Bounded: past the burst, requests faster than 20 r/s (an edge hit takes a few ms)
        # meet the limit long before 400; a slow machine only adds tokens, never removes them.
        while len(statuses) < 400 and statuses.count(429) < 5:
            # verify per request: a Session's verify loses to REQUESTS_CA_BUNDLE (requests #3829).
            statuses.append(session.get(url, timeout=30, verify=str(edge.cert)).status_code)
    assert set(statuses) <= {200, 429}
    assert statuses[:100] == [200] * 100, "a burst of 100 (one page of images) passes"
    assert statuses.count(429) == 5


def test_metrics_and_version_stay_private_through_nginx(nginx_in_front):
    edge, server = nginx_in_front
    assert edge.get("/metrics").status_code == 404
    health = edge.get("/healthz")
    assert health.status_code == 200 and "X-Image-Proxy-Version" not in health.headers
    assert requests.get(server.base + "/metrics", timeout=10).status_code == 200, "loopback scrape still works"


def test_public_healthz_gives_the_status_but_not_the_redis_error(nginx_binary, start_gunicorn, tmp_path):
    server = start_gunicorn(redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    direct = requests.get(server.base + "/healthz", timeout=10)
    assert direct.status_code == 503 and "redis" in direct.json()["error"], "operators see the reason"
    edge = Nginx(nginx_binary, tmp_path / "nginx", server.port)
    try:
        public = edge.get("/healthz")
        assert public.status_code == 503
        assert public.json() == {"status": "unavailable"}
    finally:
        edge.stop()


def test_a_cold_page_of_60_thumbnails_over_h2_decodes_every_image_in_chromium(nginx_in_front, upstream, chromium):
    """A real page: 60 distinct <img> on a cold cache, through the shipped nginx with TLS and
    HTTP/2 (Chromium sends them all at once on one connection). A browser does not retry an
    image that got a 503, so every one of them must decode."""
    edge, _ = nginx_in_front
    photos = ["waterfall_1800x1200.jpg", "portrait_1200x1800.jpg", "paddleboat_3264x1836.jpg",
              "saw_2725x2225.jpg", "insect_2560x1280.jpg", "lunch_3264x1836.jpg"]
    nonce = time.time_ns()
    tags = "\n".join(
        f'<img id="i{i}" width="160" src="{edge.base}/image?url='
        f'{quote(upstream.url(f"v/{nonce}-{i}/photos/{photos[i % len(photos)]}"), safe="")}&amp;w=320&amp;format=auto">'
        for i in range(60)
    )
    upstream.pages["thumbnails.html"] = f'<!doctype html><meta charset="utf-8"><body>{tags}</body>'
    tab = chromium.page()
    tab.send("Security.setIgnoreCertificateErrors", ignore=True)
    tab.send("Network.enable")
    tab.set_viewport(1280, 900)
    started = time.monotonic()
    tab.navigate(upstream.url("page/thumbnails.html"))
    tab.wait_for("[...document.images].every(i => i.complete)", timeout=90)
    last_image = time.monotonic() - started
    decoded = tab.evaluate("[...document.images].filter(i => i.naturalWidth > 0).length")
    statuses = [response["status"] for response in image_responses(tab)]
    protocols = {response.get("protocol") for response in image_responses(tab)}
    print(f"60 cold thumbnails over h2: {decoded} decoded, last one {last_image:.2f} s after navigation")
    assert decoded == 60, f"statuses seen: {sorted(statuses)}"
    assert protocols == {"h2"}
