"""Overload, restarts and faults against real gunicorn and real redis-server processes.

Timeouts are shortened by settings so each scenario runs in seconds; `make chaos` runs the
same scenarios at realistic sizes and prints a table.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from app.embedded_redis import start_embedded_redis
from tests.conftest import free_port
from tests.processes import start_holder

pytestmark = pytest.mark.e2e

PHOTO = "photos/panda_3872x2592.jpg"


def image(server, upstream, path: str, **params: object) -> str:
    extra = "".join(f"&{k}={v}" for k, v in params.items())
    return f"{server.base}/image?url={quote(upstream.url(path), safe='')}{extra}"


def test_misses_past_the_queue_get_an_immediate_503_and_hits_keep_flowing(start_gunicorn, upstream):
    server = start_gunicorn(workers="1", threads="8", max_queue="4", render_slots="1")
    hit_url = image(server, upstream, PHOTO, w=50)
    assert requests.get(hit_url, timeout=30).status_code == 200  # cached from now on
    barrier = threading.Barrier(12)

    def miss(index: int) -> tuple[int, str | None, float]:
        barrier.wait()
        started = time.monotonic()
        response = requests.get(image(server, upstream, f"v/{index}/slow-image/3/{PHOTO}", w=64), timeout=30)
        return response.status_code, response.headers.get("Retry-After"), time.monotonic() - started

    hit_latencies: list[float] = []

    def hits() -> None:
        time.sleep(0.5)
        with requests.Session() as session:
            for _ in range(20):
                started = time.monotonic()
                response = session.get(hit_url, timeout=10)
                assert response.status_code == 200 and response.headers["X-Cache"] == "HIT"
                hit_latencies.append(time.monotonic() - started)

    hitter = threading.Thread(target=hits)
    hitter.start()
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(miss, range(12)))
    hitter.join()
    refused = [r for r in results if r[0] == 503]
    assert {r[0] for r in results} <= {200, 503}
    assert len(refused) >= 12 - 4 - 1, "at most MAX_QUEUE misses in flight (one more may slip in as one ends)"
    assert all(retry == "1" for _, retry, _ in refused)
    assert all(elapsed < 1.5 for _, _, elapsed in refused), "refusals come at once, not after the 3 s misses"
    assert len(hit_latencies) == 20
    assert sorted(hit_latencies)[10] < 0.5, "hits are not queued behind the slow misses"


def test_hup_reload_under_load_loses_no_request_and_keeps_the_embedded_cache(start_gunicorn, upstream):
    server = start_gunicorn(workers="2")
    cached = image(server, upstream, PHOTO, w=80)
    assert requests.get(cached, timeout=30).headers["X-Cache"] == "MISS"
    old_workers = set(server.workers())
    stop = time.monotonic() + 4.0
    failures: list[str] = []
    statuses: list[int] = []

    def load(index: int) -> None:
        n = 0
        while time.monotonic() < stop and n < 400:
            n += 1
            url = cached if n % 2 else image(server, upstream, f"v/{index}-{n}/photos/waterfall_1800x1200.jpg", w=32)
            try:
                # A new connection per request: what a client that reconnects sees (no stale keep-alive).
                response = requests.get(url, timeout=30, headers={"Connection": "close"})
                statuses.append(response.status_code)
            except requests.RequestException as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    os.kill(server.process.pid, signal.SIGHUP)
    for thread in threads:
        thread.join()
    assert failures == []
    assert statuses and set(statuses) == {200}
    new_workers = set(server.workers())
    assert new_workers and not (new_workers & old_workers), "HUP replaced the workers"
    assert requests.get(cached, timeout=30).headers["X-Cache"] == "HIT", "the embedded Redis kept its data"


def test_term_lets_an_in_flight_render_finish_then_cleans_up(start_gunicorn, upstream):
    server = start_gunicorn(workers="1")
    redis_dirs = {p for p in Path("/tmp").glob("image-proxy-redis-*")}
    result: dict[str, object] = {}

    def slow_request() -> None:
        response = requests.get(image(server, upstream, "slow-image/1.5/" + PHOTO, w=300), timeout=30)
        result["status"] = response.status_code

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.5)
    os.kill(server.process.pid, signal.SIGTERM)
    thread.join()
    assert result["status"] == 200
    assert server.process.wait(30) == 0
    assert {p for p in Path("/tmp").glob("image-proxy-redis-*")} <= redis_dirs, "socket directory removed"


def test_lock_holder_killed_mid_render_is_taken_over_after_the_lock_expires(start_gunicorn, redis_server,
                                                                           redis_client, upstream):
    holder = start_gunicorn(redis_url=redis_server.url, workers="1", lock_expire="3")
    waiter = start_gunicorn(redis_url=redis_server.url, workers="1", lock_expire="3")
    path = "slow-first/30/" + PHOTO
    start_holder(image(holder, upstream, path, w=200), lambda: upstream.hits["/" + path], give_up_s=10)
    assert upstream.hits["/" + path] == 1, "the holder is fetching"
    result: dict[str, object] = {}

    def wait_for_it() -> None:
        response = requests.get(image(waiter, upstream, path, w=200), timeout=60)
        result.update(status=response.status_code, done=time.monotonic())

    thread = threading.Thread(target=wait_for_it)
    thread.start()
    time.sleep(0.5)
    killed = time.monotonic()
    for pid in holder.workers():
        os.kill(pid, signal.SIGKILL)
    thread.join(30)
    assert result["status"] == 200
    recovery = result["done"] - killed  # type: ignore[operator]
    assert recovery < 3 + 1 + 3, f"took over {recovery:.1f} s after the holder died (lock expiry 3 s)"
    assert upstream.hits["/" + path] == 2


@pytest.fixture
def own_redis():
    port = free_port()
    server = start_embedded_redis(port=port)
    yield server
    server.stop()


def test_stalled_redis_gives_bypass_within_the_socket_timeout_then_hits_again(start_gunicorn, own_redis, upstream):
    server = start_gunicorn(redis_url=own_redis.url, workers="1", redis_timeout="0.25")
    url = image(server, upstream, "photos/waterfall_1800x1200.jpg", w=60)
    assert requests.get(url, timeout=30).headers["X-Cache"] == "MISS"
    warm = [requests.get(url, timeout=30) for _ in range(3)]
    assert all(r.headers["X-Cache"] == "HIT" for r in warm)
    uncached = image(server, upstream, "photos/waterfall_1800x1200.jpg", w=61)
    baseline = min(_timed(uncached + f"&n={i}") for i in range(3))  # misses while Redis answers

    os.kill(own_redis.pid, signal.SIGSTOP)
    try:
        stalled = []
        for i in range(4):
            started = time.monotonic()
            response = requests.get(url + f"&n={i}", timeout=30)
            stalled.append(time.monotonic() - started)
            assert response.status_code == 200 and response.headers["X-Cache"] == "BYPASS"
        health = requests.get(server.base + "/healthz", timeout=5)
        assert health.status_code == 503
    finally:
        os.kill(own_redis.pid, signal.SIGCONT)
    assert min(stalled) < baseline + 0.25 + 0.3, f"BYPASS took {min(stalled):.2f} s against {baseline:.2f} s"
    give_up = time.monotonic() + 5
    while requests.get(url, timeout=30).headers["X-Cache"] != "HIT":
        assert time.monotonic() < give_up, "no HIT within 5 s of SIGCONT"
        time.sleep(0.1)


def _timed(url: str) -> float:
    started = time.monotonic()
    assert requests.get(url, timeout=30).status_code == 200
    return time.monotonic() - started


def test_redis_restarted_empty_while_waiters_wait_hangs_nobody(start_gunicorn, upstream):
    port = free_port()
    redis_server = start_embedded_redis(port=port)
    servers = [redis_server]
    try:
        server = start_gunicorn(redis_url=redis_server.url, workers="2", request_budget="8")
        path = "slow-first/2/photos/saw_2725x2225.jpg"
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(requests.get, image(server, upstream, path, w=100), timeout=30) for _ in range(6)]
            time.sleep(0.7)
            servers[-1].stop()
            servers.append(start_embedded_redis(port=port))
            started = time.monotonic()
            responses = [f.result() for f in futures]
        assert time.monotonic() - started < 8 + 2
        assert {r.status_code for r in responses} == {200}
        assert requests.get(image(server, upstream, "photos/saw_2725x2225.jpg", w=101), timeout=30).status_code == 200
    finally:
        servers[-1].stop()


def test_many_trickling_upstreams_are_all_answered_and_hits_still_flow(start_gunicorn, upstream):
    server = start_gunicorn(workers="2", upstream_timeout="2", request_budget="6")
    hit_url = image(server, upstream, "photos/waterfall_1800x1200.jpg", w=40)
    requests.get(hit_url, timeout=30)
    started = time.monotonic()

    def trickle(index: int) -> tuple[int, float]:
        t0 = time.monotonic()
        response = requests.get(image(server, upstream, f"v/{index}/trickle?bytes=500&every=0.05"), timeout=30)
        return response.status_code, time.monotonic() - t0

    hit_times: list[float] = []

    def hits() -> None:
        with requests.Session() as session:
            while time.monotonic() - started < 3 and len(hit_times) < 200:
                t0 = time.monotonic()
                assert session.get(hit_url, timeout=10).status_code == 200
                hit_times.append(time.monotonic() - t0)
                time.sleep(0.05)

    hitter = threading.Thread(target=hits)
    hitter.start()
    with ThreadPoolExecutor(100) as pool:
        results = list(pool.map(trickle, range(100)))
    hitter.join()
    assert {status for status, _ in results} <= {503, 504}
    assert max(elapsed for _, elapsed in results) < 2 + 6, "every request answered within the budget"
    assert hit_times and sorted(hit_times)[len(hit_times) // 2] < 0.1, "hits keep flowing"
    assert requests.get(hit_url, timeout=10).headers["X-Cache"] == "HIT"


def test_no_leaks_over_a_bounded_mixed_run(start_gunicorn, upstream):
    server = start_gunicorn(workers="1", threads="8", max_queue="6")
    urls = [
        image(server, upstream, PHOTO, w=64),  # hits after the first
        image(server, upstream, "status/500"),
        image(server, upstream, "edge/random.bin"),
        f"{server.base}/image?url=nonsense",
    ]

    def run(rounds: int) -> list[int]:
        statuses = []
        for n in range(rounds):
            for url in urls:
                statuses.append(requests.get(url, timeout=30).status_code)
            statuses.append(requests.get(image(server, upstream, f"v/{n}/photos/waterfall_1800x1200.jpg", w=33),
                                         timeout=30).status_code)
            # A client that goes away mid-response.
            with requests.get(image(server, upstream, PHOTO, w=64), stream=True, timeout=30) as response:
                response.raw.read(10)
        return statuses

    (worker,) = server.workers()
    run(10)  # warm: thread pool and connection pools filled
    before = _resources(worker)
    statuses = run(30)
    after = _resources(worker)
    assert 500 not in statuses
    assert after["fds"] <= before["fds"] + 2, (before, after)
    assert after["threads"] <= before["threads"] + 1, (before, after)


def _resources(pid: int) -> dict[str, int]:
    time.sleep(0.5)  # let finished requests release their sockets
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads}


def test_a_worker_recycles_itself_after_its_renders_not_after_hits(start_gunicorn, upstream):
    server = start_gunicorn(workers="1", recycle_renders="3")
    (first,) = server.workers()
    hit = image(server, upstream, PHOTO, w=40)
    with requests.Session() as session:
        assert session.get(hit, timeout=30).status_code == 200  # render 1
        for _ in range(200):  # hits never count
            assert session.get(hit, timeout=30).headers["X-Cache"] == "HIT"
    assert server.workers() == [first]
    statuses = [requests.get(image(server, upstream, PHOTO, w=41 + i), timeout=30).status_code for i in range(3)]
    assert statuses == [200, 200, 200], "the render that triggers the recycle is answered"
    give_up = time.monotonic() + 30
    while time.monotonic() < give_up and server.workers() in ([first], []):
        time.sleep(0.1)
    assert server.workers() and first not in server.workers(), "the worker left gracefully and was replaced"
    assert requests.get(hit, timeout=30).headers["X-Cache"] == "HIT"
