"""Process trees read from /proc: a server's children, its workers, its embedded Redis.

Shared by the end-to-end tests and the benchmarks, which signal and measure only processes
they started, found by parent PID (never by name).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def children(pid: int) -> list[int]:
    return [child for child in _pids() if _ppid(child) == pid]


def tree(root: int) -> list[int]:
    """root and all its descendants."""
    by_parent: dict[int, list[int]] = {}
    for pid in _pids():
        parent = _ppid(pid)
        if parent is not None:
            by_parent.setdefault(parent, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(by_parent.get(pid, []))
    return found


def is_redis(pid: int) -> bool:
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def redis_socket(pid: int) -> str:
    # redis-server rewrites its command line; its --dir (the private directory) is its cwd.
    return os.path.join(os.readlink(f"/proc/{pid}/cwd"), "redis.sock")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by `pids` together (those still alive)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_idle(pids: list[int], quiet: float = 0.5, limit: float = 60.0) -> float:
    """Wait (at most `limit` s) until `pids` together use under 5 % of a core for `quiet`
    seconds, e.g. until a render left running after its request answered is over; returns
    the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = cpu_seconds(pids)
        time.sleep(quiet)
        if cpu_seconds(pids) - before < 0.05 * quiet:
            break
    return time.monotonic() - started


def start_holder(url: str, fetches: Callable[[], int], give_up_s: float = 15.0) -> None:
    """Send a request that takes an image's lock and stalls in its upstream fetch (a
    slow-first path), in a background thread; return once `fetches()` (the upstream's count
    for that path) says the fetch began. The request is expected to die with its worker."""
    import contextlib
    import threading

    import requests

    def hold() -> None:
        with contextlib.suppress(requests.RequestException):
            requests.get(url, timeout=60)

    threading.Thread(target=hold, daemon=True).start()
    give_up = time.monotonic() + give_up_s
    while not fetches() and time.monotonic() < give_up:
        time.sleep(0.05)
