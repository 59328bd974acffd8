"""Real gunicorn: what a worker leaves behind when it goes, and what the master looks after.

- Recycled workers' metric files are folded into archives: the metrics directory stays
  bounded and the request counter in /metrics never goes backwards.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.e2e


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
