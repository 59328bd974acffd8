"""The service-wide memory ledger (app/memory.py), with real processes sharing one ledger file."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from app.errors import Busy, OverMemoryBudget
from app.memory import (
    MB,
    MemoryBudget,
    cgroup_memory_limit,
    create_ledger,
    default_memory_budget,
    machine_memory,
    read_ledger_budget,
    remove_ledger,
    service_baseline,
)

SPAWN = multiprocessing.get_context("spawn")  # no fork of a threaded pytest


def _hold(path: str, nbytes: int, deadline_s: float, connection) -> None:
    """Child process: reserve `nbytes`, report, hold until told to release."""
    budget = MemoryBudget.from_ledger(path)
    try:
        with budget.reserve(nbytes, time.monotonic() + deadline_s):
            connection.send("held")
            connection.poll(30)
    except Busy:
        connection.send("busy")


class Holder:
    """A child process holding a reservation in the shared ledger. A pipe, not Events: a
    multiprocessing Event can deadlock its setter once a waiter on it was SIGKILLed."""

    def __init__(self, path: str, nbytes: int, deadline_s: float = 10.0) -> None:
        self.connection, child_end = SPAWN.Pipe()
        self.process = SPAWN.Process(target=_hold, args=(path, nbytes, deadline_s, child_end))
        self.process.start()

    def is_held(self) -> bool:
        return self.connection.poll(0)

    def wait_held(self, timeout: float = 20.0) -> str:
        assert self.connection.poll(timeout), "child never reported"
        return self.connection.recv()

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self.connection.send("release")
        self.process.join(10)
        if self.process.is_alive():
            assert self.process.pid is not None
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.join(10)
        self.connection.close()


@pytest.fixture
def ledger(tmp_path: Path):
    path = create_ledger(1000 * MB, 200 * MB, directory=str(tmp_path))
    yield path
    remove_ledger(path)


def test_the_master_writes_the_budget_into_the_ledger_and_workers_read_it(ledger):
    assert read_ledger_budget(ledger) == (1000 * MB, 200 * MB)
    budget = MemoryBudget.from_ledger(ledger)
    assert budget.limit == 800 * MB
    assert budget.available() == 800 * MB
    assert oct(os.stat(os.path.dirname(ledger)).st_mode & 0o777) == "0o700"


def test_reservations_add_up_across_processes(ledger):
    child = Holder(ledger, 300 * MB)
    try:
        assert child.wait_held() == "held"
        budget = MemoryBudget.from_ledger(ledger)
        assert budget.in_use() == 300 * MB
        with budget.reserve(500 * MB, time.monotonic() + 1):
            assert budget.in_use() == 800 * MB
            assert budget.available() == 0
            with pytest.raises(Busy):
                budget.reserve(1 * MB, time.monotonic() + 0.1)
        assert budget.in_use() == 300 * MB
    finally:
        child.stop()


def test_a_waiter_gets_in_when_another_process_releases(ledger):
    budget = MemoryBudget.from_ledger(ledger)
    first = budget.reserve(600 * MB, time.monotonic() + 1)
    child = Holder(ledger, 400 * MB, deadline_s=20)
    try:
        time.sleep(0.5)
        assert not child.is_held(), "the child got in although 600 + 400 MB > 800 MB"
        released_at = time.monotonic()
        first.release()
        assert child.wait_held() == "held"
        assert budget.in_use() == 400 * MB
        assert time.monotonic() - released_at < 5
    finally:
        child.stop()
    assert budget.in_use() == 0


def test_a_sigkilled_holders_bytes_are_reclaimed(ledger):
    child = Holder(ledger, 700 * MB)
    assert child.wait_held() == "held"
    budget = MemoryBudget.from_ledger(ledger)
    assert budget.in_use() == 700 * MB
    assert child.process.pid is not None
    os.kill(child.process.pid, signal.SIGKILL)
    child.process.join(10)
    assert budget.in_use() == 0
    with budget.reserve(800 * MB, time.monotonic() + 1) as reservation:
        assert reservation.nbytes == 800 * MB


def test_a_waiter_in_another_process_gets_in_when_the_holder_is_killed(ledger):
    budget = MemoryBudget.from_ledger(ledger)
    child = Holder(ledger, 700 * MB)
    try:
        assert child.wait_held() == "held"
        waiting = threading.Thread(target=lambda: budget.reserve(500 * MB, time.monotonic() + 20).release())
        waiting.start()
        time.sleep(0.2)
        assert waiting.is_alive()
        assert child.process.pid is not None
        os.kill(child.process.pid, signal.SIGKILL)
        child.process.join(10)
        waiting.join(10)
        assert not waiting.is_alive()
    finally:
        child.stop()


def test_the_deadline_gives_busy_and_leaves_nothing_behind(ledger):
    budget = MemoryBudget.from_ledger(ledger)
    with budget.reserve(700 * MB, time.monotonic() + 1):
        started = time.monotonic()
        with pytest.raises(Busy) as raised:
            budget.reserve(200 * MB, started + 0.3)
        assert raised.value.status == 503 and raised.value.retry_after
        assert time.monotonic() - started >= 0.3
        assert budget.in_use() == 700 * MB
    assert budget.in_use() == 0
    with budget.reserve(800 * MB, time.monotonic() + 1):  # the timed-out waiter left the queue
        pass


def test_a_request_that_can_never_fit_is_a_400_at_once_naming_the_limit(ledger):
    budget = MemoryBudget.from_ledger(ledger)
    started = time.monotonic()
    with pytest.raises(OverMemoryBudget) as raised:
        budget.reserve(900 * MB, time.monotonic() + 10)
    assert time.monotonic() - started < 1
    error = raised.value
    assert error.status == 400 and error.cacheable
    assert "IMAGE_PROXY_MEMORY_BUDGET" in error.message
    assert "900 MB" in error.message and "800 MB" in error.message


def test_grow_waits_for_room_and_refuses_what_can_never_fit(ledger):
    budget = MemoryBudget.from_ledger(ledger)
    body = budget.reserve(100 * MB, time.monotonic() + 1)
    other = budget.reserve(600 * MB, time.monotonic() + 1)
    body.grow(100 * MB, time.monotonic() + 1)
    assert budget.in_use() == 800 * MB
    with pytest.raises(Busy):
        body.grow(1 * MB, time.monotonic() + 0.1)
    threading.Timer(0.2, other.release).start()
    body.grow(300 * MB, time.monotonic() + 5)
    assert body.nbytes == 500 * MB and budget.in_use() == 500 * MB
    with pytest.raises(OverMemoryBudget):
        body.grow(301 * MB, time.monotonic() + 5)
    body.release()
    body.release()  # idempotent
    assert budget.in_use() == 0


def test_a_big_waiter_is_not_starved_by_later_small_requests(ledger):
    budget = MemoryBudget.from_ledger(ledger)
    small = budget.reserve(300 * MB, time.monotonic() + 1)
    got: list[str] = []
    big = threading.Thread(target=lambda: got.append(budget.reserve(700 * MB, time.monotonic() + 10).nbytes and "big"))
    big.start()
    time.sleep(0.2)  # the big one is queued
    # 300 held + 700 waiting: a newcomer of 200 MB would fit beside what is held, but would
    # delay the earlier waiter, so it must wait too.
    with pytest.raises(Busy):
        budget.reserve(200 * MB, time.monotonic() + 0.3)
    small.release()
    big.join(10)
    assert got == ["big"]
    assert budget.in_use() == 700 * MB


def test_many_threads_never_hold_more_than_the_limit(ledger):
    budget = MemoryBudget.from_ledger(ledger)
    peak = [0]
    lock = threading.Lock()
    held = [0]

    def worker(index: int) -> None:
        for round_ in range(20):
            nbytes = (50 + (index * 37 + round_ * 11) % 300) * MB
            with budget.reserve(nbytes, time.monotonic() + 20):
                with lock:
                    held[0] += nbytes
                    peak[0] = max(peak[0], held[0])
                time.sleep(0.001)
                with lock:
                    held[0] -= nbytes

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert 300 * MB < peak[0] <= 800 * MB
    assert budget.in_use() == 0


def test_without_a_ledger_path_the_process_gets_its_own():
    budget = MemoryBudget(500 * MB, 100 * MB)
    try:
        with budget.reserve(400 * MB, time.monotonic() + 1):
            assert budget.available() == 0
    finally:
        remove_ledger(budget.ledger_path)


# -- the default budget -------------------------------------------------------------------------


def _fake_root(tmp_path: Path, cgroup: str, mountinfo: str, files: dict[str, str]) -> str:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text("MemTotal:       8000000 kB\nMemFree: 1 kB\n")
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    (tmp_path / "proc/self/mountinfo").write_text(mountinfo)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return str(tmp_path)


def test_cgroup_v2_memory_max_bounds_the_default_budget(tmp_path):
    root = _fake_root(
        tmp_path,
        "0::/system.slice/image-proxy.service\n",
        "41 23 0:38 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n",
        {
            "sys/fs/cgroup/system.slice/image-proxy.service/memory.max": "2147483648\n",
            "sys/fs/cgroup/system.slice/memory.max": "max\n",
        },
    )
    assert cgroup_memory_limit(root) == 2 * 1024**3
    assert machine_memory(root) == 2 * 1024**3
    assert default_memory_budget(root) == int(2 * 1024**3 * 0.8)


def test_a_parent_cgroups_lower_limit_wins(tmp_path):
    root = _fake_root(
        tmp_path,
        "0::/a/b\n",
        "41 23 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
        {"sys/fs/cgroup/a/b/memory.max": "max\n", "sys/fs/cgroup/a/memory.max": "1073741824\n"},
    )
    assert cgroup_memory_limit(root) == 1024**3


def test_cgroup_v1_limit_and_its_no_limit_value(tmp_path):
    mountinfo = "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    root = _fake_root(tmp_path, "4:memory:/docker/abc\n", mountinfo,
                      {"sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n"})
    assert cgroup_memory_limit(root) is None
    assert machine_memory(root) == 8000000 * 1024  # MemTotal
    (tmp_path / "sys/fs/cgroup/memory/memory.limit_in_bytes").write_text("3221225472\n")
    assert cgroup_memory_limit(root) == 3 * 1024**3


def test_no_cgroup_means_memtotal(tmp_path):
    root = _fake_root(tmp_path, "0::/\n", "", {})
    assert cgroup_memory_limit(root) is None
    assert default_memory_budget(root) == int(8000000 * 1024 * 0.8)


def test_the_baseline_counts_workers_and_an_embedded_redis_only():
    alone = service_baseline(2, None)
    assert service_baseline(4, None) > alone
    assert service_baseline(2, 256 * MB) > alone + 256 * MB
    assert service_baseline(2, 0) == alone  # maxmemory 0 = unbounded: nothing to count


def test_this_machines_budget_is_positive_and_below_its_memory():
    assert 0 < default_memory_budget() < machine_memory()
