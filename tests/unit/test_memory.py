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
    ADMIT,
    GIVE_WAY,
    LEDGER_ENV,
    MB,
    ROW_MARGIN,
    WAIT,
    MemoryBudget,
    _Row,
    cgroup_memory_limit,
    create_ledger,
    default_memory_budget,
    ledger_rows,
    machine_memory,
    process_budget,
    read_ledger_budget,
    read_ledger_header,
    remove_ledger,
    service_baseline,
    table_of,
    verdict,
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


def test_newcomers_wait_for_a_waiter_past_its_patience_only_when_later_requests_hold_it_up(tmp_path):
    path = create_ledger(1000 * MB, 200 * MB, directory=str(tmp_path), patience_s=0.3)
    budget = MemoryBudget.from_ledger(path)  # limit 800 MB
    first = budget.reserve(300 * MB, time.monotonic() + 1)
    got: list[str] = []
    big = threading.Thread(target=lambda: got.append(budget.reserve(700 * MB, time.monotonic() + 20).nbytes and "big"))
    big.start()
    _wait_for(lambda: budget.waiting() == [(0, 700 * MB)])
    # It has not waited long: a newcomer that fits beside what is held passes it.
    late = budget.reserve(150 * MB, time.monotonic() + 0.2)
    time.sleep(0.4)  # past its patience, but held up by `first`, which came before it
    assert _passes(budget, 0)
    first.release()  # now only `late` keeps it out (150 + 700 > 800): newcomers wait for it
    _wait_for(lambda: not _passes(budget, 0))
    assert got == []
    late.release()
    big.join(10)
    assert got == ["big"]
    assert budget.in_use() == 700 * MB


def _passes(budget: MemoryBudget, nbytes: int) -> bool:
    try:
        budget.reserve(nbytes, time.monotonic() + 0.05).release()
    except Busy:
        return False
    return True


def _wait_for(condition, timeout: float = 20.0) -> None:
    """A hang guard, not a timing assertion: the condition must come true eventually."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "the condition never came true"
        time.sleep(0.01)


def test_grow_to_holds_at_least_the_total(ledger):
    budget = MemoryBudget.from_ledger(ledger)
    with budget.reserve(26 * MB, time.monotonic() + 1) as held:
        held.grow_to(26 * MB + 4 * MB, time.monotonic() + 1)  # the body on top of the render's floor
        assert held.nbytes == 30 * MB
        held.grow_to(10 * MB, time.monotonic() + 1)  # already holds more: nothing to do
        assert held.nbytes == 30 * MB and budget.in_use() == 30 * MB
        with pytest.raises(OverMemoryBudget):
            held.grow_to(801 * MB, time.monotonic() + 1)


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


# -- one reservation per miss: who waits for whom ------------------------------------------------


def _row(index: int, held: int, want: int = 0, since: int = 0, admitted: int = 0) -> _Row:
    return _Row(index, index + 1, held * MB, want * MB, since, admitted)


SECOND = 1_000_000_000


def test_a_grower_gets_in_when_it_fits_whoever_waits_before_it():
    rows = [_row(0, 50, 930, since=1), _row(1, 100), _row(2, 10)]
    grower = _row(2, 10, 20)
    assert verdict(table_of(rows), grower, 1000 * MB, 60 * SECOND, 2 * SECOND, newcomer=False) == ADMIT


def test_a_newcomer_waits_only_for_a_waiter_past_its_patience_held_up_by_later_requests():
    # A big render waits since 10 s; a small one admitted at 10.5 s holds 100 MB.
    rows = [_row(0, 50, 930, since=10 * SECOND, admitted=9 * SECOND), _row(1, 100, admitted=10.5 * SECOND)]
    newcomer = _Row(-1, 9, 0, 0, 11 * SECOND)
    assert verdict(table_of(rows), newcomer, 1000 * MB, 11 * SECOND, 2 * SECOND, newcomer=True) == ADMIT
    later = newcomer._replace(since=13 * SECOND)
    assert verdict(table_of(rows), later, 1000 * MB, 13 * SECOND, 2 * SECOND, newcomer=True) == WAIT
    # Blocked by a render that started before it: holding newcomers back would not help.
    rows[1] = _row(1, 100, admitted=9.5 * SECOND)
    assert verdict(table_of(rows), later, 1000 * MB, 13 * SECOND, 2 * SECOND, newcomer=True) == ADMIT
    # A newcomer that began waiting first is not held up by a younger one's patience, only
    # by not fitting.
    rows = [_row(0, 0, 300, since=5 * SECOND), _row(1, 50, 930, since=6 * SECOND), _row(2, 700, admitted=7 * SECOND)]
    assert verdict(table_of(rows), rows[0], 1000 * MB, 13 * SECOND, 2 * SECOND, newcomer=True) == WAIT
    rows[2] = _row(2, 0)
    assert verdict(table_of(rows), rows[0], 1000 * MB, 13 * SECOND, 2 * SECOND, newcomer=True) == ADMIT


def test_waiters_that_hold_every_byte_give_way_youngest_first_until_the_oldest_fits():
    rows = [_row(0, 100, 850, since=1), _row(1, 100, 850, since=2), _row(2, 100, 850, since=3)]
    verdicts = [verdict(table_of(rows), row, 1000 * MB, 10, SECOND, newcomer=False) for row in rows]
    assert verdicts == [WAIT, GIVE_WAY, GIVE_WAY]
    # 50 + 30 + 40 held, the oldest wants 900: the youngest's 40 MB are enough.
    rows = [_row(0, 50, 900, since=1), _row(1, 30, 900, since=2), _row(2, 40, 900, since=3)]
    verdicts = [verdict(table_of(rows), row, 1000 * MB, 10, SECOND, newcomer=False) for row in rows]
    assert verdicts == [WAIT, WAIT, GIVE_WAY]


def test_nobody_gives_way_while_a_running_holder_or_a_fitting_waiter_will_free_bytes():
    waiters = [_row(0, 100, 850, since=1), _row(1, 100, 850, since=2)]
    running = [*waiters, _row(2, 10)]
    assert [verdict(table_of(running), row, 1000 * MB, 10, SECOND, newcomer=False) for row in waiters] == [WAIT, WAIT]
    fitting = [*waiters, _row(2, 10, 20, since=3)]
    assert [verdict(table_of(fitting), row, 1000 * MB, 10, SECOND, newcomer=False) for row in waiters] == [WAIT, WAIT]


def test_small_newcomers_do_not_wait_for_a_big_one_blocked_by_an_earlier_render(tmp_path):
    path = create_ledger(1000 * MB, 0, directory=str(tmp_path), patience_s=0.1)
    budget = MemoryBudget.from_ledger(path)
    running = budget.reserve(600 * MB, time.monotonic() + 1)  # a big render that started first
    got: list[str] = []

    def big() -> None:
        with budget.reserve(0, time.monotonic() + 20) as held:
            held.grow(50 * MB, time.monotonic() + 20)
            held.grow(700 * MB, time.monotonic() + 20)
            got.append("big")

    waiter = threading.Thread(target=big)
    waiter.start()
    _wait_for(lambda: budget.waiting() == [(50 * MB, 700 * MB)])
    time.sleep(0.2)  # past its patience
    for _ in range(5):  # 600 + 50 + 700 > 1000 whatever newcomers do: they pass
        with budget.reserve(0, time.monotonic() + 0.5) as small:
            small.grow(300 * MB, time.monotonic() + 0.5)
    with budget.reserve(0, time.monotonic() + 0.5) as small:
        small.grow(300 * MB, time.monotonic() + 0.5)
        running.release()  # only this later request keeps it out now (300 + 50 + 700 > 1000)
        with pytest.raises(Busy):
            budget.reserve(0, time.monotonic() + 0.2)
    waiter.join(10)
    assert got == ["big"]


def test_a_waiter_behind_another_big_render_gives_way_when_its_body_keeps_a_small_one_out():
    running = _row(0, 1356)  # a 48 MP render, for seconds
    big = _row(1, 50, 1331, since=1)  # the next one: cannot fit until that one is done
    small = _row(2, 4, 30, since=2)  # a thumbnail's render: fits only without the big one's body
    table = table_of([running, big, small])
    assert verdict(table, big, 1433 * MB, 10, SECOND, newcomer=False) == GIVE_WAY
    assert verdict(table, small, 1433 * MB, 10, SECOND, newcomer=False) == WAIT
    # Behind smaller renders (none holds half the limit) it keeps its place: they finish soon.
    table = table_of([_row(0, 700), _row(3, 650), big, small])
    assert verdict(table, big, 1433 * MB, 10, SECOND, newcomer=False) == WAIT
    # And nobody needs its body: it keeps it.
    table = table_of([running, big])
    assert verdict(table, big, 1433 * MB, 10, SECOND, newcomer=False) == WAIT


def _smalls(path: str, threads: int, body: int, render: int, connection) -> None:
    """Child process: `threads` misses, each reserve(0) -> grow(body) -> grow(render); each
    reports "in" and holds until the parent says "release"."""
    budget = MemoryBudget.from_ledger(path)
    release = threading.Event()
    send = threading.Lock()

    def miss() -> None:
        try:
            with budget.reserve(0, time.monotonic() + 60) as held:
                held.grow(body, time.monotonic() + 60)
                held.grow(render, time.monotonic() + 60)
                with send:
                    connection.send("in")
                release.wait(60)
        except Busy:
            with send:
                connection.send("busy")

    workers = [threading.Thread(target=miss) for _ in range(threads)]
    for worker in workers:
        worker.start()
    if connection.poll(60):
        connection.recv()
    release.set()
    for worker in workers:
        worker.join(60)
    with send:
        connection.send("done")


def _big(path: str, body: int, render: int, connection) -> None:
    """Child process: one miss whose render wants most of the limit."""
    budget = MemoryBudget.from_ledger(path)
    try:
        with budget.reserve(0, time.monotonic() + 60) as held:
            held.grow(body, time.monotonic() + 60)
            connection.send("body")
            held.grow(render, time.monotonic() + 60)
            connection.send("in")
            connection.poll(60)
    except Busy as exc:
        connection.send(f"busy: {exc.message}")


class Child:
    def __init__(self, target, *args) -> None:
        self.connection, child_end = SPAWN.Pipe()
        self.process = SPAWN.Process(target=target, args=(*args, child_end))
        self.process.start()

    def recv(self, timeout: float = 30.0) -> str:
        assert self.connection.poll(timeout), "child never reported"
        return self.connection.recv()

    def ready(self) -> bool:
        return self.connection.poll(0)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.send("release")
        self.process.join(30)
        if self.process.is_alive():
            assert self.process.pid is not None
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.join(10)


def test_the_gallery_small_renders_pass_a_big_one_that_cannot_fit_yet(tmp_path):
    """Scaled from the issue: a w=0 AVIF of a 48 MP photo wants 0.93 of the limit while a
    render is in flight; 24 thumbnail misses, each holding its body, all get in meanwhile,
    and the big one gets in once they are done. Patience is long here: this is the
    grower rule alone."""
    path = create_ledger(1000 * MB, 0, directory=str(tmp_path), patience_s=60)
    budget = MemoryBudget.from_ledger(path)
    in_flight = budget.reserve(100 * MB, time.monotonic() + 1)
    big = Child(_big, path, 50 * MB, 930 * MB)
    children: list[Child] = []
    try:
        assert big.recv() == "body"
        _wait_for(lambda: budget.waiting() == [(50 * MB, 930 * MB)])
        children = [Child(_smalls, path, 8, 10 * MB, 20 * MB) for _ in range(3)]
        answers = [child.recv() for child in children for _ in range(8)]
        assert answers == ["in"] * 24
        assert not big.ready(), "the big one got in beside 24 smalls and a render in flight"
        assert budget.in_use() == 100 * MB + 50 * MB + 24 * 30 * MB <= budget.limit
        for child in children:
            child.connection.send("release")
            assert child.recv() == "done"
        assert not big.ready(), "the big one got in beside the render in flight"
        in_flight.release()
        assert big.recv() == "in"
        assert budget.in_use() == 980 * MB
    finally:
        for child in [*children, big]:
            child.stop()
        in_flight.release()
    assert budget.in_use() == 0


def _thumbnails(path: str, count: int, connection) -> None:
    """Child process: `count` thumbnail misses in threads, each as serve makes one: the
    render's floor, the body (twice while joined), then the render's peak; each reports."""
    budget = MemoryBudget.from_ledger(path)
    send = threading.Lock()

    def miss() -> None:
        floor, body, peak = 26 * MB, 4 * MB, 30 * MB
        try:
            with budget.reserve(floor, time.monotonic() + 30) as held:
                held.grow_to(floor + 2 * body, time.monotonic() + 30)
                held.shrink_to(floor + body)
                held.grow_to(body + peak, time.monotonic() + 30)
                time.sleep(0.05)  # the render
            answer = "in"
        except Busy:
            answer = "busy"
        with send:
            connection.send(answer)

    workers = [threading.Thread(target=miss) for _ in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    connection.poll(60)


def test_thumbnails_beside_a_running_big_render_are_not_kept_out_by_the_next_big_ones_body(tmp_path):
    """The issue's gallery at the shipped unit's limit (1,433 MB): one 48 MP render runs
    (1,356 MB), the next waits holding its body; 8 thumbnails would fit only without that
    body. The waiting one gives way at once; the thumbnails all render while the first big
    one still runs."""
    path = create_ledger(1433 * MB, 0, directory=str(tmp_path))
    budget = MemoryBudget.from_ledger(path)
    running = budget.reserve(1356 * MB, time.monotonic() + 1)
    big = Child(_big, path, 51 * MB, 1305 * MB)
    thumbnails = None
    try:
        assert big.recv() == "body"
        _wait_for(lambda: budget.waiting() == [(51 * MB, 1305 * MB)])
        thumbnails = Child(_thumbnails, path, 8)
        assert big.recv().startswith("busy: this image gave its share")
        assert [thumbnails.recv() for _ in range(8)] == ["in"] * 8
        assert budget.in_use() == 1356 * MB  # the first big render still runs
    finally:
        for child in [big, *([thumbnails] if thumbnails else [])]:
            child.stop()
        running.release()
    assert budget.in_use() == 0


def _stream(path: str, threads: int, nbytes: int, connection) -> None:
    """Child process: small misses in a loop until told to stop; reports how many got in."""
    budget = MemoryBudget.from_ledger(path)
    stop = threading.Event()
    admitted = [0] * threads

    def loop(slot: int) -> None:
        for _ in range(10_000):
            if stop.is_set():
                return
            with contextlib.suppress(Busy), budget.reserve(0, time.monotonic() + 30) as held:
                held.grow(nbytes, time.monotonic() + 30)
                admitted[slot] += 1
                time.sleep(0.05)

    workers = [threading.Thread(target=loop, args=(slot,)) for slot in range(threads)]
    for worker in workers:
        worker.start()
    while not stop.is_set():
        if connection.poll(60):
            message = connection.recv()
            if message == "count":
                connection.send(sum(admitted))
            else:
                stop.set()
        else:
            stop.set()
    for worker in workers:
        worker.join(60)
    connection.send(sum(admitted))


def test_a_stream_of_small_newcomers_cannot_keep_a_waiting_big_render_out(tmp_path):
    """Eight small misses in two processes always hold some bytes, so the big one never fits
    beside them; once it has waited its patience, newcomers wait for it."""
    path = create_ledger(1000 * MB, 0, directory=str(tmp_path), patience_s=0.3)
    budget = MemoryBudget.from_ledger(path)
    streams = [Child(_stream, path, 4, 30 * MB) for _ in range(2)]
    big = None
    try:
        _wait_for(lambda: budget.in_use() > 0)
        big = Child(_big, path, 50 * MB, 930 * MB)
        assert big.recv() == "body"
        _wait_for(lambda: budget.waiting() == [(50 * MB, 930 * MB)])
        before = []
        for stream in streams:
            stream.connection.send("count")
            before.append(stream.recv())
        answer = big.recv(timeout=60)
        assert answer == "in", answer  # not a 503 at its deadline: it was not starved
        for stream in streams:
            stream.connection.send("count")
        after = [stream.recv() for stream in streams]
        assert sum(after) > sum(before), "the newcomers passed the big one while it had patience"
        big.stop()
        for stream in streams:
            stream.connection.send("stop")
        final = [stream.recv() for stream in streams]
        assert sum(final) >= sum(after)  # and the stream went on once the big one was done
    finally:
        for child in [*streams, *([big] if big else [])]:
            child.stop()
    assert budget.in_use() == 0


def _grower(budget: MemoryBudget, body: int, render: int, ready: threading.Event, go: threading.Event,
            results: dict[str, str], name: str) -> None:
    with budget.reserve(0, time.monotonic() + 30) as held:
        held.grow(body, time.monotonic() + 30)
        ready.set()
        go.wait(30)
        try:
            held.grow(render, time.monotonic() + 30)
            results[name] = "in"
        except Busy as exc:
            results[name] = exc.message


def test_growers_that_block_each_other_give_way_to_the_oldest_at_once(ledger):
    budget = MemoryBudget.from_ledger(ledger)  # limit 800 MB
    results: dict[str, str] = {}
    threads = []
    gates = []
    for name in ("oldest", "middle", "youngest"):
        ready, go = threading.Event(), threading.Event()
        thread = threading.Thread(target=_grower, args=(budget, 100 * MB, 650 * MB, ready, go, results, name))
        thread.start()
        assert ready.wait(10)
        threads.append(thread)
        gates.append(go)
    for waiting, go in enumerate(gates, start=1):
        go.set()
        _wait_for(lambda waiting=waiting: len(budget.waiting()) == waiting or results)
    for thread in threads:
        thread.join(30)
    assert results["oldest"] == "in"
    for name in ("middle", "youngest"):
        assert "gave its share" in results[name], results[name]  # at once, not at the deadline
    assert budget.in_use() == 0


def test_the_ledger_is_sized_from_the_settings_and_holds_more_than_4096_reservations(tmp_path):
    assert ledger_rows(2, 64) == 2 * 64 * 2 + ROW_MARGIN
    rows = ledger_rows(20, 128)  # allowed settings: 5,184 rows
    path = create_ledger(1000 * MB, 0, directory=str(tmp_path), rows=rows)
    assert read_ledger_header(path).rows == rows
    budget = MemoryBudget.from_ledger(path)
    held = [budget.reserve(1, time.monotonic() + 5) for _ in range(4500)]
    assert budget.reservations() == 4500 and budget.in_use() == 4500
    for reservation in held:
        reservation.release()
    small = create_ledger(1000 * MB, 0, directory=str(tmp_path), rows=3)
    tiny = MemoryBudget.from_ledger(small)
    taken = [tiny.reserve(0, time.monotonic() + 1) for _ in range(3)]
    with pytest.raises(Busy):  # the table is the bound: a fourth waits for a row
        tiny.reserve(0, time.monotonic() + 0.1)
    taken[0].release()
    tiny.reserve(0, time.monotonic() + 1).release()


def test_a_process_without_a_master_sizes_its_ledger_from_the_settings(monkeypatch):
    monkeypatch.delenv(LEDGER_ENV, raising=False)
    budget = process_budget(1000 * MB, 4, None, threads=100)
    try:
        assert budget.rows == ledger_rows(4, 100)
    finally:
        remove_ledger(budget.ledger_path)


def test_a_ledger_of_another_version_is_refused_by_name(tmp_path):
    path = tmp_path / "ledger"
    path.write_bytes(b"IPML" + (1).to_bytes(4, "little") + bytes(64))
    with pytest.raises(ValueError, match="version 1"):
        read_ledger_header(str(path))


def test_a_forked_child_reopens_the_ledger_and_never_frees_its_parents_bytes(ledger):
    budget = MemoryBudget.from_ledger(ledger)
    parent = budget.reserve(300 * MB, time.monotonic() + 1)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only the budget object it inherited, then _exit
        code = 1
        try:
            parent.release()  # the parent's row is not the child's to free
            with budget.reserve(500 * MB, time.monotonic() + 5) as mine:
                code = 0 if budget.in_use() == 800 * MB and mine.nbytes == 500 * MB else 2
        finally:
            os.write(write_end, bytes([code]))
            os._exit(0)
    os.close(write_end)
    try:
        assert os.read(read_end, 1) == b"\x00"
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert budget.in_use() == 300 * MB
    parent.release()
    assert budget.in_use() == 0
