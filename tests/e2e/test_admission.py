"""Admission by time on the default settings: a cold page is served whole, a hot new image
is rendered once for everybody, and gunicorn's own thread flag is honoured."""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest
import requests

from tests.conftest import ROOT, Gunicorn, free_port, gunicorn_env
from tests.dedup_rounds import one_round

pytestmark = pytest.mark.e2e

PHOTOS = ["photos/waterfall_1800x1200.jpg", "photos/portrait_1200x1800.jpg", "photos/paddleboat_3264x1836.jpg",
          "photos/saw_2725x2225.jpg"]


def image_url(server, upstream, path: str, **params: object) -> str:
    extra = "".join(f"&{k}={v}" for k, v in params.items())
    return f"{server.base}/image?url={quote(upstream.url(path), safe='')}{extra}"


def test_a_cold_page_of_64_distinct_misses_is_served_whole(start_gunicorn, upstream):
    server = start_gunicorn()  # the defaults: 2 workers x 64 threads
    nonce = uuid.uuid4().hex
    urls = [image_url(server, upstream, f"v/{nonce}-{i}/{PHOTOS[i % len(PHOTOS)]}", w=640) for i in range(64)]
    barrier = threading.Barrier(64)

    def get(url: str) -> tuple[int, float]:
        barrier.wait()
        started = time.monotonic()
        response = requests.get(url, timeout=60)
        return response.status_code, time.monotonic() - started

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(get, urls))
    latencies = sorted(elapsed for _, elapsed in results)
    print(f"64 cold misses: p50 {statistics.median(latencies):.2f} s, max {latencies[-1]:.2f} s")
    assert [status for status, _ in results] == [200] * 64, "every image of the page is served"


def test_120_identical_requests_for_a_new_image_are_all_served_from_one_render(start_gunicorn, upstream):
    server = start_gunicorn()
    fetches, statuses, bodies, cache = one_round([server.base], upstream, "photos/waterfall_1800x1200.jpg", 120)
    assert statuses == [200] * 120
    assert fetches == 1 and bodies == 1
    assert cache.count("MISS") == 1


def _start(tmp_path, extra_env: dict[str, str], **settings: str) -> Gunicorn:
    port = free_port()
    env = gunicorn_env(bind=f"127.0.0.1:{port}", allow_networks="127.0.0.0/8", **settings)
    env.update(extra_env)
    return Gunicorn(env, port, tmp_path / f"gunicorn-{port}.log").start()


@pytest.mark.parametrize("how", ["setting", "gunicorn flag"])
def test_four_threads_alone_work_and_keep_a_thread_for_hits(tmp_path, upstream, how):
    if how == "setting":
        server = _start(tmp_path, {}, workers="1", threads="4")
    else:
        server = _start(tmp_path, {"GUNICORN_CMD_ARGS": "--threads 4"}, workers="1")
    try:
        hit = image_url(server, upstream, "photos/portrait_1200x1800.jpg", w=40)
        assert requests.get(hit, timeout=30).status_code == 200
        nonce = uuid.uuid4().hex
        slow = [image_url(server, upstream, f"v/{nonce}-{i}/slow-image/2/photos/portrait_1200x1800.jpg", w=40)
                for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            misses = [pool.submit(requests.get, url, timeout=30) for url in slow]
            time.sleep(0.5)
            # Derived from the real thread count (4 - 4/8 -> 3 miss places), so one thread
            # stays free: the hit is answered while the misses hold theirs.
            started = time.monotonic()
            response = requests.get(hit, timeout=30)
            hit_seconds = time.monotonic() - started
            statuses = sorted(future.result().status_code for future in misses)
        assert response.headers["X-Cache"] == "HIT"
        assert hit_seconds < 1.5, "the hit did not wait for the 2 s misses"
        assert statuses == [200, 200, 200, 503], "three miss places, the fourth shed at once"
    finally:
        server.stop()


def test_gunicorn_thread_flag_is_checked_against_an_explicit_max_queue(tmp_path):
    env = gunicorn_env(max_queue="24", bind=f"127.0.0.1:{free_port()}")
    env["GUNICORN_CMD_ARGS"] = "--threads 4"
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "IMAGE_PROXY_MAX_QUEUE=24" in result.stderr and "--threads 4" in result.stderr
