"""Real gunicorn (2 workers, the project's gunicorn.conf.py), real HTTP, embedded Redis."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from tests import processes
from tests.conftest import ROOT, gunicorn_env

pytestmark = pytest.mark.e2e

PHOTO = "photos/panda_3872x2592.jpg"


def test_32_concurrent_identical_misses_fetch_once_across_workers(start_gunicorn, upstream):
    server = start_gunicorn(workers="2", threads="40", max_queue="36")
    # A slow upstream keeps the first fetch open while all 32 requests arrive.
    url = f"{server.base}/image?url={quote(upstream.url('slow-image/0.5/' + PHOTO), safe='')}&w=480"
    barrier = threading.Barrier(32)

    def one(_: int) -> tuple[int, bytes, str]:
        with requests.Session() as session:
            barrier.wait()
            response = session.get(url, timeout=30)
            return response.status_code, response.content, response.headers.get("X-Cache", "")

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert [status for status, _, _ in results] == [200] * 32
    assert len({body for _, body, _ in results}) == 1, "32 identical bodies"
    assert [cache for _, _, cache in results].count("MISS") == 1
    assert upstream.hits["/slow-image/0.5/" + PHOTO] == 1, "exactly one upstream fetch"


def test_embedded_redis_belongs_to_the_master_and_stops_with_it(start_gunicorn, upstream):
    server = start_gunicorn()
    assert requests.get(server.base + "/healthz", timeout=5).json() == {"status": "ok", "redis": "ok"}
    url = f"{server.base}/image?url={quote(upstream.url(PHOTO), safe='')}&w=100"
    assert requests.get(url, timeout=30).headers["X-Cache"] == "MISS"
    assert requests.get(url, timeout=30).headers["X-Cache"] == "HIT"  # shared across workers
    redis_pids = [pid for pid in processes.children(server.process.pid) if processes.is_redis(pid)]
    assert len(redis_pids) == 1
    socket_dir = Path(processes.redis_socket(redis_pids[0])).parent
    assert socket_dir.exists()
    assert server.stop() == 0
    time.sleep(0.2)
    assert not Path(f"/proc/{redis_pids[0]}").exists() or _is_zombie(redis_pids[0])
    assert not socket_dir.exists(), "the embedded Redis's socket directory is removed"


def test_bad_setting_stops_startup_with_a_message_naming_it(tmp_path):
    env = gunicorn_env(upstream_timeout="soon", max_width="-5", bind="127.0.0.1:1")
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "IMAGE_PROXY_UPSTREAM_TIMEOUT" in result.stderr
    assert "IMAGE_PROXY_MAX_WIDTH" in result.stderr


def test_readme_curl_example_works_on_a_started_service(start_gunicorn, upstream):
    server = start_gunicorn()
    response = requests.get(
        f"{server.base}/image", params={"url": upstream.url(PHOTO), "w": "640", "q": "75", "format": "avif"}, timeout=30
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/avif"


def _is_zombie(pid: int) -> bool:
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True

