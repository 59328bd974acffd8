"""Folding dead workers' prometheus_client files into archives keeps every total.

Each "worker" is a real short-lived Python process writing real multiprocess files into a
temporary PROMETHEUS_MULTIPROC_DIR; once it has exited its pid is dead, as after a recycle.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from app.metrics_cleanup import LOCK_NAME, LockedMultiProcessCollector, archive_dead_workers, on_child_exit

WORKER = """
import sys
from prometheus_client import Counter, Gauge, Histogram, Summary
n = int(sys.argv[1])
Counter("c_total", "c", ["kind"]).labels("a").inc(n)
Counter("jobs_total", "j").inc(2 * n)
h = Histogram("h_seconds", "h", buckets=(1, 5))
for value in (0.5, 3, 9)[: n]:
    h.observe(value)
Summary("s_seconds", "s").observe(n)
Gauge("g_max", "g", multiprocess_mode="max").set(n)
Gauge("g_min", "g", multiprocess_mode="min").set(n)
Gauge("g_sum", "g", multiprocess_mode="sum").set(n)
Gauge("g_recent", "g", multiprocess_mode="mostrecent").set(n)
Gauge("g_all", "g", multiprocess_mode="all").set(n)
Gauge("g_live", "g", multiprocess_mode="livesum").set(n)
"""


def run_worker(directory: Path, n: int) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    subprocess.run([sys.executable, "-c", WORKER, str(n)], env=env, check=True, timeout=60)


def samples(directory: Path, collector=MultiProcessCollector) -> dict[tuple, float]:
    found = {}
    for metric in collector(None, path=str(directory)).collect():
        for sample in metric.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pid"))
            found[(sample.name, labels)] = sample.value
    return found


def db_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.db"))


@pytest.fixture
def metrics_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "metrics"
    directory.mkdir()
    return directory


def test_dead_workers_files_become_one_archive_per_type_with_the_same_totals(metrics_dir):
    for n in (1, 2, 3):
        run_worker(metrics_dir, n)
    before = samples(metrics_dir)
    assert len(db_files(metrics_dir)) > 20  # ~10 files per worker

    removed = archive_dead_workers(metrics_dir, live_pids=())

    assert removed >= 27
    assert db_files(metrics_dir) == sorted(
        f"{kind}_archive.db"
        for kind in ("counter", "histogram", "summary", "gauge_max", "gauge_min", "gauge_sum", "gauge_mostrecent")
    )
    after = samples(metrics_dir)
    dropped = {key for key in before if key[0] in ("g_all", "g_live")}
    assert after == {key: value for key, value in before.items() if key not in dropped}
    assert after[("c_total", (("kind", "a"),))] == 6
    assert after[("h_seconds_bucket", (("le", "+Inf"),))] == 6  # 1 + 2 + 3 observations
    assert after[("g_max", ())] == 3 and after[("g_min", ())] == 1 and after[("g_sum", ())] == 6
    assert after[("g_recent", ())] == 3


def test_later_recycles_add_to_the_archive_and_never_go_back(metrics_dir):
    totals = []
    for n in (1, 2, 3, 4):
        run_worker(metrics_dir, n)
        archive_dead_workers(metrics_dir, live_pids=())
        totals.append(samples(metrics_dir)[("jobs_total", ())])
    assert totals == [2, 6, 12, 20]
    assert len(db_files(metrics_dir)) == 7


def test_files_of_live_processes_are_left_alone(metrics_dir):
    run_worker(metrics_dir, 1)
    # This test process is alive; a listed worker pid is kept even if the check says dead.
    mine = metrics_dir / f"counter_{os.getpid()}.db"
    listed = metrics_dir / "counter_999999999.db"
    dead = next(metrics_dir.glob("counter_[0-9]*.db"))
    mine.write_bytes(dead.read_bytes())
    listed.write_bytes(dead.read_bytes())
    archive_dead_workers(metrics_dir, live_pids=(999999999,))
    assert mine.exists() and listed.exists() and not dead.exists()


def test_the_master_does_not_wait_for_a_scrape_holding_the_lock(metrics_dir):
    run_worker(metrics_dir, 1)
    files = db_files(metrics_dir)
    with open(metrics_dir / LOCK_NAME, "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_SH)  # a scrape in progress
        assert archive_dead_workers(metrics_dir, live_pids=(), wait=0.05) == 0
        assert db_files(metrics_dir) == files
        # The scrape itself (a shared lock) still reads meanwhile.
        assert samples(metrics_dir, LockedMultiProcessCollector)[("jobs_total", ())] == 2
    assert archive_dead_workers(metrics_dir, live_pids=()) > 0


def test_child_exit_hook_removes_the_live_gauges_and_folds_the_rest(metrics_dir):
    run_worker(metrics_dir, 5)
    pid = int(next(metrics_dir.glob("counter_[0-9]*.db")).stem.split("_")[1])
    assert on_child_exit(pid, live_pids=(), directory=str(metrics_dir)) > 0
    assert not list(metrics_dir.glob(f"*_{pid}.db"))
    assert samples(metrics_dir)[("jobs_total", ())] == 10


def test_child_exit_without_a_metrics_directory_does_nothing(tmp_path):
    assert on_child_exit(12345, live_pids=(), directory=str(tmp_path / "missing")) == 0
