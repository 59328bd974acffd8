"""Signed URLs on a real gunicorn (2 workers): the helper command's URLs and srcset are all
served; unsigned, re-spelled and doubled signatures are refused before any fetch."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from app.signing import Signer

pytestmark = pytest.mark.e2e

NEW_KEY = "e2e-new-signing-key-0123456789abcdefghij"
OLD_KEY = "e2e-old-signing-key-0123456789abcdefghij"
SOURCE = "photos/waterfall_1800x1200.jpg"
COMMAND = Path(sys.executable).parent / "image-proxy-url"


def run_helper(*args: str) -> str:
    assert COMMAND.exists(), "the image-proxy-url console script is installed by `make venv`"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGE_PROXY_")}
    env["IMAGE_PROXY_SIGNING_KEYS"] = f"{NEW_KEY},{OLD_KEY}"
    result = subprocess.run([str(COMMAND), *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def server(start_gunicorn):
    return start_gunicorn(workers="2", signing_keys=f"{NEW_KEY},{OLD_KEY}")


def test_the_helpers_srcset_and_url_are_all_served(server, upstream):
    source = upstream.url(SOURCE)
    lines = run_helper("--base", server.base, source, "--widths", "160,320,480", "-q", "70",
                       "-f", "avif,webp").splitlines()
    assert len(lines) == 2
    served = []
    for line, content_type in zip(lines, ("image/avif", "image/webp"), strict=True):
        srcset = html.unescape(re.fullmatch(r'<source type="([^"]+)" srcset="([^"]+)">', line).group(2))
        for candidate in srcset.split(", "):
            url, width = candidate.rsplit(" ", 1)
            response = requests.get(url, timeout=60)
            assert response.status_code == 200, (url, response.text)
            assert response.headers["Content-Type"] == content_type
            served.append((width, response.headers["X-Source-Width"]))
    assert [width for width, _ in served] == ["160w", "320w", "480w"] * 2

    one = run_helper("--base", server.base, source, "-w", "200").strip()
    assert requests.get(one, timeout=60).status_code == 200
    plain = run_helper("--base", server.base, source, "--widths", "160,320").strip()
    assert all(requests.get(c.rsplit(" ", 1)[0], timeout=60).status_code == 200 for c in plain.split(", "))
    assert upstream.hits["/" + SOURCE] <= 2, "one source, kept across variants (and at most once per worker)"


def test_unsigned_and_badly_signed_requests_are_refused_before_any_fetch(server, upstream):
    good = Signer((OLD_KEY,), server.base).url(upstream.url("v/e2e/" + SOURCE), w=120)
    assert requests.get(good, timeout=60).status_code == 200, "signed with the second key: verifies"
    upstream.reset()
    base, s = good.rsplit("&s=", 1)
    cases = {base: 403, f"{base}&s={s}%3D": 403, f"{base}&s={s[:-1]}": 403, f"{base}&s={s}&s={s}": 400,
             good.replace("w=120", "w=121"): 403}
    for url, status in cases.items():
        response = requests.get(url, timeout=60)
        assert response.status_code == status, url
        assert response.headers["Cache-Control"] == "no-store" and "error" in response.json()
    assert sum(upstream.hits.values()) == 0
    assert requests.get(server.base + "/", timeout=10).status_code == 404, "no front page with signing on"
