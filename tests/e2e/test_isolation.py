"""Real gunicorn: what a worker leaves behind when it goes, and what the master looks after.

- Recycled workers' metric files are folded into archives: the metrics directory stays
  bounded and the request counter in /metrics never goes backwards.
- The embedded Redis is the master's: SIGKILLed, it is back on the same socket and caching
  resumes without a restart; no worker exit (recycle, HUP, --preload's inherited atexit)
  ever stops it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from app.cache import DOWN_S
from tests import processes

pytestmark = pytest.mark.e2e
PHOTO = "photos/waterfall_1800x1200.jpg"


def metrics_dir(server) -> Path:
    """The PROMETHEUS_MULTIPROC_DIR gunicorn.conf.py made: where the workers' .db files are open."""
    for pid in server.workers():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = Path(os.readlink(fd)) if fd.is_symlink() else None
            if target is not None and target.suffix == ".db" and "image-proxy-metrics-" in str(target):
                return target.parent
    raise AssertionError("no worker has a metrics file open")


def requests_total(server) -> float:
    lines = requests.get(server.base + "/metrics", timeout=10).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("image_proxy_requests_total{"))


def pids_with_files(directory: Path) -> set[int]:
    pids = set()
    for path in directory.glob("*.db"):
        tail = path.stem.rsplit("_", 1)[-1]
        if tail.isdigit():
            pids.add(int(tail))
    return pids


def test_recycled_workers_leave_a_bounded_metrics_directory_and_counters_never_go_back(
    start_gunicorn, redis_server, monkeypatch
):
    # Every worker is replaced after 6 requests: 60 requests recycle about ten of them.
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--max-requests 6 --max-requests-jitter 0")
    server = start_gunicorn(redis_url=redis_server.url, workers="2", threads="4", max_queue="2")
    directory = metrics_dir(server)
    baseline = requests_total(server)
    sent = 1  # the baseline scrape itself is counted once it is answered
    seen_workers: set[int] = set(server.workers())
    totals, file_counts = [], []
    for _round in range(10):
        for _ in range(5):
            assert requests.get(server.base + "/healthz", timeout=30).status_code == 200
            sent += 1
        total = requests_total(server)
        totals.append(total - baseline)
        sent += 1
        assert total - baseline == sent - 1, "every answered request is counted exactly once"
        seen_workers |= set(server.workers())
        file_counts.append(len(list(directory.glob("*.db"))))
    print(f"workers seen {len(seen_workers)}, counter deltas {totals}, .db files per round {file_counts}")
    assert totals == sorted(totals)
    assert len(seen_workers) >= 6, "workers were recycled"

    # Once the master has reaped the last exits, only live processes and archives have files.
    master = server.process.pid
    give_up = time.monotonic() + 10
    while time.monotonic() < give_up:
        live = {master, *server.workers()}
        if pids_with_files(directory) <= live:
            break
        time.sleep(0.1)
    assert pids_with_files(directory) <= {master, *server.workers()}
    kinds = {path.stem.rsplit("_", 1)[0] for path in directory.glob("*_[0-9]*.db")}
    archives = {path.stem.removesuffix("_archive") for path in directory.glob("*_archive.db")}
    assert archives and archives <= kinds
    # master + 2 workers + at most one exiting worker not yet reaped, and one archive per kind
    assert max(file_counts) <= len(kinds) * (1 + 2 + 1) + len(archives)


# -- the embedded Redis belongs to the master ---------------------------------------------


def cache_status(server, upstream, nonce: str) -> str:
    source = quote(upstream.url(f"v/{nonce}/{PHOTO}"), safe="")
    response = requests.get(f"{server.base}/image?url={source}&w=40", timeout=30)
    assert response.status_code == 200
    return response.headers["X-Cache"]


def test_a_killed_embedded_redis_is_restarted_on_its_socket_and_caching_resumes(start_gunicorn, upstream):
    server = start_gunicorn(workers="2", redis_timeout="0.25")
    assert cache_status(server, upstream, "before") == "MISS"
    assert cache_status(server, upstream, "before") == "HIT"
    old_pid = server.embedded_redis_pid()
    assert old_pid is not None
    socket_path = processes.redis_socket(old_pid)

    killed = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    healthy = cached = None
    n = 0
    while time.monotonic() - killed < 15 and cached is None:
        n += 1
        if healthy is None and requests.get(server.base + "/healthz", timeout=5).status_code == 200:
            healthy = time.monotonic() - killed
        if healthy is not None and cache_status(server, upstream, f"after-{n}") in ("MISS", "HIT"):
            cached = time.monotonic() - killed
        time.sleep(0.05)
    print(f"after SIGKILL: /healthz 200 in {healthy} s, X-Cache MISS/HIT again in {cached} s")
    # The requirement is "restarted within 5 s"; 10 s leaves room for a loaded machine.
    assert cached is not None and cached < 10
    new_pid = server.embedded_redis_pid()
    assert new_pid not in (None, old_pid)
    assert processes.redis_socket(new_pid) == socket_path, "the same socket path the workers know"
    # A worker that met the outage skips Redis for DOWN_S after its last failure, then probes:
    # past that, both workers use the new Redis.
    time.sleep(DOWN_S + 0.1)
    assert cache_status(server, upstream, "again") == "MISS"
    assert cache_status(server, upstream, "again") == "HIT", "shared by both workers again"
    assert "restarting it" in server.log_path.read_text(errors="replace")  # the whole log: the tail is all polls


def test_worker_exits_never_stop_the_embedded_redis(start_gunicorn, monkeypatch):
    # --preload runs create_app in the master, which then registers atexit(stop_owned):
    # every worker inherits that hook, and the recycles and HUP below make workers exit.
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--preload --max-requests 4 --max-requests-jitter 0")
    server = start_gunicorn(workers="2", threads="4", max_queue="2")
    redis_pid = server.embedded_redis_pid()
    assert redis_pid is not None
    first_workers = set(server.workers())
    for _ in range(24):
        assert requests.get(server.base + "/healthz", timeout=30).status_code == 200
    os.kill(server.process.pid, signal.SIGHUP)
    give_up = time.monotonic() + 20
    while time.monotonic() < give_up and (set(server.workers()) & first_workers or len(server.workers()) < 2):
        time.sleep(0.1)
    for _ in range(8):
        assert requests.get(server.base + "/healthz", timeout=30).status_code == 200
    assert server.embedded_redis_pid() == redis_pid, "the very same server: never stopped, never restarted"
    assert "restarting it" not in server.log()
