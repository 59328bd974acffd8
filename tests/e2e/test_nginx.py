"""The shipped deploy/nginx.conf in front of real gunicorn, with real Debian nginx."""

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


class Nginx:
    def __init__(self, binary: str, prefix: Path, proxy_port: int) -> None:
        self.port = free_port()
        prefix.mkdir(parents=True, exist_ok=True)
        site = (ROOT / "deploy" / "nginx.conf").read_text()
        site = site.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{proxy_port};")
        site = site.replace("listen 80;", f"listen 127.0.0.1:{self.port};")
        site = site.replace("/var/cache/nginx/image-proxy", str(prefix / "cache"))
        assert str(prefix / "cache") in site and f":{proxy_port};" in site, "deploy/nginx.conf changed shape"
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
                requests.get(self.base + "/healthz", timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("nginx did not start")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def nginx_in_front(start_gunicorn, tmp_path):
    binary = ensure_binary("nginx", "nginx-light")
    server = start_gunicorn()
    edge = Nginx(binary, tmp_path / "nginx", server.port)
    yield edge, server
    edge.stop()


def test_images_through_nginx_keep_the_contract_and_hits_come_from_the_edge(nginx_in_front, upstream):
    edge, _ = nginx_in_front
    url = f"{edge.base}/image?url={quote(upstream.url('photos/saw_2725x2225.jpg'), safe='')}&w=320"
    first = requests.get(url, timeout=30)
    second = requests.get(url, timeout=30)
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
    revalidated = requests.get(url, headers={"If-None-Match": first.headers["ETag"]}, timeout=30)
    assert revalidated.status_code == 304


def test_errors_pass_through_nginx_with_their_status_and_are_not_cached(nginx_in_front, upstream):
    edge, _ = nginx_in_front
    for path, status in (("status/404", 404), ("status/500", 502), ("edge/vector.svg", 400)):
        url = f"{edge.base}/image?url={quote(upstream.url(path), safe='')}"
        for _ in range(2):
            response = requests.get(url, timeout=30)
            assert response.status_code == status
            assert response.headers["Content-Type"] == "application/json"
            assert response.json()["error"]
            assert response.headers.get("X-Edge-Cache") != "HIT"
    bad = requests.get(f"{edge.base}/image?w=abc", timeout=30)
    assert bad.status_code == 400 and "url" in bad.json()["error"]


def test_format_auto_through_nginx_keeps_the_variants_apart(nginx_in_front, upstream):
    edge, _ = nginx_in_front
    url = f"{edge.base}/image?url={quote(upstream.url('photos/waterfall_1800x1200.jpg'), safe='')}&w=200&format=auto"
    avif = requests.get(url, headers={"Accept": "image/avif,image/webp,*/*"}, timeout=30)
    webp = requests.get(url, headers={"Accept": "image/webp,*/*"}, timeout=30)
    avif_again = requests.get(url, headers={"Accept": "image/avif,image/webp,*/*"}, timeout=30)
    assert avif.headers["Content-Type"] == avif_again.headers["Content-Type"] == "image/avif"
    assert webp.headers["Content-Type"] == "image/webp"
    assert avif.headers["Vary"] == "Accept"


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
    types = {
        event["params"]["response"]["url"]: event["params"]["response"]["mimeType"]
        for event in tab.events
        if event.get("method") == "Network.responseReceived" and event["params"].get("type") == "Image"
    }
    auto_types = {mime for url, mime in types.items() if "format=auto" in url}
    assert auto_types == {"image/avif"}, "Chromium's Accept names image/avif, so format=auto answers AVIF"
    assert types[f"{edge.base}/image?url={source}&w=300&format=avif"] == "image/avif"
    assert types[f"{edge.base}/image?url={source}&w=300&format=webp"] == "image/webp"
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    tab.screenshot(artifacts / "nginx-img-srcset.png", width=1280)

