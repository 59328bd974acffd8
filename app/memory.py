"""The service's memory budget: one ledger of reserved bytes shared by every worker of a machine.

A render or a fetched body reserves its estimated bytes before it allocates them and releases
them when done; what does not fit waits, up to the request's deadline, then gets a 503
(`Busy`). A single request that could never fit, even alone, gets a 400 at once
(`OverMemoryBudget`, naming IMAGE_PROXY_MEMORY_BUDGET). The budget is for the whole service,
not per worker, so one 48 MP render may use most of it while the other workers idle.

    budget    IMAGE_PROXY_MEMORY_BUDGET, or 80 % of the cgroup limit (v2 memory.max, v1
              memory.limit_in_bytes) or of MemTotal: the kernel must never OOM-kill first
    baseline  what the service uses with nothing in flight: the master, WORKERS idle workers
              and the embedded Redis's maxmemory (plus its overhead) when it is embedded
    limit     budget - baseline: what renders and bodies may reserve together

The ledger is a small file (one per service, in a private 0700 directory the gunicorn master
makes before forking and names in LEDGER_ENV), mmap'd by every worker: a header and a fixed
table of rows (pid, process start time, token, bytes, ticket), each change made under
`fcntl.flock`. Rows whose process is gone (SIGKILLed, OOM-killed, recycled) are reclaimed by
the next reader: the pid is checked with its start time, so a reused pid does not keep a dead
worker's bytes alive, and a zombie counts as dead.

States of a request: holding (a row with ticket 0, its bytes counted), waiting (a row with a
ticket, its bytes not counted but kept free for it), or neither. Invariants:
- the bytes held never exceed the limit;
- a waiter is never overtaken by a later request that would delay it: a newcomer gets in only
  if it fits beside everything held and every earlier waiter's request (backfilling), so a
  big render is not starved by a stream of small ones;
- `grow` (a streamed body learning its size) does not queue: it already holds bytes, and
  finishing it frees them soonest;
- release is idempotent, and a dead process's rows are freed without its help.
Local waiters wake at once on a local release (a Condition); waiters in other processes poll
every POLL_S.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from app.errors import Busy, OverMemoryBudget

MB = 1024 * 1024
#: Names the ledger file, set by the gunicorn master before it forks. Not a setting (no
#: IMAGE_PROXY_ prefix, so the unknown-variable warning never names it).
LEDGER_ENV = "_IMAGE_PROXY_MEMORY_LEDGER"
#: How much of the machine's (or cgroup's) memory the derived budget takes.
DEFAULT_FRACTION = 0.80
#: RSS of the gunicorn master (measured 59 MB) and of an idle worker: measured 48 MB at start
#: and 68 MB after 20 small renders; 120 MB leaves room for the heap glibc keeps after big
#: renders (the 10,000-request soak settles at ~210 MB a worker, in-flight renders included).
MASTER_RSS = 64 * MB
IDLE_WORKER_RSS = 120 * MB
#: redis-server's RSS beyond its maxmemory (allocator fragmentation, buffers, its own code).
REDIS_OVERHEAD = 0.15
REDIS_FIXED = 16 * MB
#: How often a waiter looks for room freed by another worker (its own worker's releases wake
#: it at once): a render takes hundreds of ms, and every look sweeps the whole table.
POLL_S = 0.05

_MAGIC = b"IPML"
_VERSION = 1
_HEADER = struct.Struct("<4sIqqq")  # magic, version, next ticket, budget bytes, baseline bytes
_ROW = struct.Struct("<qqqqq")  # pid, start time, token, bytes, ticket (0: holding; >0: waiting)
ROWS = 4096
LEDGER_SIZE = _HEADER.size + ROWS * _ROW.size


# -- process identity -----------------------------------------------------------------------


def process_start(pid: int) -> int | None:
    """The start time of a live process (clock ticks since boot), None if gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    except (OSError, IndexError):  # no /proc here: fall back to "does it exist"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    if fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent: its memory is gone
        return None
    return int(fields[19])


# -- the ledger file --------------------------------------------------------------------------


def create_ledger(budget_bytes: int, baseline_bytes: int, directory: str | None = None) -> str:
    """Make a ledger in a new private directory and return its path (the master's job)."""
    private = tempfile.mkdtemp(prefix="image-proxy-memory-", dir=directory)  # mode 0700
    path = os.path.join(private, "ledger")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, LEDGER_SIZE)
        os.pwrite(fd, _HEADER.pack(_MAGIC, _VERSION, 1, budget_bytes, baseline_bytes), 0)
    finally:
        os.close(fd)
    return path


def remove_ledger(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))


def read_ledger_budget(path: str) -> tuple[int, int]:
    """(budget, baseline) as the master wrote them."""
    with open(path, "rb") as file:
        magic, version, _, budget, baseline = _HEADER.unpack(file.read(_HEADER.size))
    if magic != _MAGIC or version != _VERSION:
        raise ValueError(f"{path} is not an image-proxy memory ledger")
    return budget, baseline


class _Ledger:
    """One process's view of the file: its own descriptor (flock is per open file, so a
    descriptor inherited across fork would not exclude the parent) and mapping."""

    def __init__(self, path: str) -> None:
        self.pid = os.getpid()
        self.start = process_start(self.pid) or 0
        self.fd = os.open(path, os.O_RDWR)
        self.map = mmap.mmap(self.fd, LEDGER_SIZE)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def row(self, index: int) -> tuple[int, int, int, int, int]:
        return _ROW.unpack_from(self.map, _HEADER.size + index * _ROW.size)

    def write(self, index: int, pid: int, start: int, token: int, nbytes: int, ticket: int) -> None:
        _ROW.pack_into(self.map, _HEADER.size + index * _ROW.size, pid, start, token, nbytes, ticket)

    def clear(self, index: int) -> None:
        self.write(index, 0, 0, 0, 0, 0)

    def next_ticket(self) -> int:
        magic, version, ticket, budget, baseline = _HEADER.unpack_from(self.map, 0)
        _HEADER.pack_into(self.map, 0, magic, version, ticket + 1, budget, baseline)
        return ticket

    def sweep(self) -> list[tuple[int, int, int, int]]:
        """Free dead processes' rows; return the live ones as (index, token, bytes, ticket)."""
        live = []
        checked: dict[tuple[int, int], bool] = {}
        # One unpack over the whole table (C speed): waiters sweep it every POLL_S while
        # holding the GIL, and a cache hit in the same worker is waiting for it.
        rows = _ROW.iter_unpack(self.map[_HEADER.size : LEDGER_SIZE])
        for index, (pid, start, token, nbytes, ticket) in enumerate(rows):
            if pid == 0:
                continue
            key = (pid, start)
            if key not in checked:
                checked[key] = (pid == self.pid and start == self.start) or process_start(pid) == start
            if checked[key]:
                live.append((index, token, nbytes, ticket))
            else:
                self.clear(index)
        return live

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


# -- the budget ------------------------------------------------------------------------------


class MemoryBudget:
    """Admits reservations of bytes within `total_bytes - baseline_bytes`, for all processes
    that open the same ledger. Thread-safe; survives fork (a child reopens the file)."""

    def __init__(self, total_bytes: int, baseline_bytes: int, ledger_path: str | None = None) -> None:
        self.total = total_bytes
        self.baseline = baseline_bytes
        self.limit = max(0, total_bytes - baseline_bytes)
        if ledger_path is None:
            # Outside gunicorn (tests, create_app alone) the process is the whole service.
            ledger_path = create_ledger(total_bytes, baseline_bytes)
        self.ledger_path = ledger_path
        self._ledger: _Ledger | None = None
        self._tokens = 0
        self._reset_locks()

    @classmethod
    def from_ledger(cls, ledger_path: str) -> MemoryBudget:
        """A worker's budget: the numbers the master wrote into the ledger it made."""
        return cls(*read_ledger_budget(ledger_path), ledger_path)

    def _reset_locks(self) -> None:
        self._owner = os.getpid()
        # Serialises this process's threads (flock does not: they share one descriptor) and
        # wakes local waiters as soon as a local reservation is released or shrinks.
        self._changed = threading.Condition(threading.Lock())

    def _view(self) -> _Ledger:
        if self._ledger is None or self._ledger.pid != os.getpid():
            self._ledger = _Ledger(self.ledger_path)
        return self._ledger

    def _check_fork(self) -> None:
        if self._owner != os.getpid():  # a forked child: the parent's locks may be held
            self._reset_locks()
            self._ledger = None

    # -- reading ----------------------------------------------------------------------------

    def in_use(self) -> int:
        self._check_fork()
        with self._changed:
            ledger = self._view()
            with ledger.locked():
                return sum(nbytes for _, _, nbytes, ticket in ledger.sweep() if ticket == 0)

    def available(self) -> int:
        return max(0, self.limit - self.in_use())

    # -- reserving --------------------------------------------------------------------------

    def _busy(self) -> Busy:
        return Busy(
            f"the service's memory budget ({self.limit / MB:.0f} MB for renders) is in use "
            "by other images right now; retry shortly",
            retry_after=2,
        )

    def never_fits(self, nbytes: int) -> OverMemoryBudget:
        return OverMemoryBudget(
            f"this image needs about {nbytes / MB:.0f} MB of memory to render, more than the "
            f"{self.limit / MB:.0f} MB this service allows all renders together "
            f"(IMAGE_PROXY_MEMORY_BUDGET {self.total / MB:.0f} MB minus {self.baseline / MB:.0f} MB idle use)"
        )

    def reserve(self, nbytes: int, deadline: float) -> Reservation:
        """Hold `nbytes` until released; wait until `deadline` (time.monotonic) for room.

        OverMemoryBudget (400) at once if it can never fit; Busy (503) at the deadline.
        """
        nbytes = max(0, int(nbytes))
        if nbytes > self.limit:
            raise self.never_fits(nbytes)
        self._check_fork()
        with self._changed:
            ledger = self._view()
            self._tokens += 1
            token = self._tokens
            mine: int | None = None  # my row while waiting
            ticket = 0
            try:
                while True:
                    with ledger.locked():
                        live = ledger.sweep()
                        held = sum(n for _, _, n, t in live if t == 0)
                        ahead = sum(n for i, _, n, t in live if t and (not ticket or t < ticket) and i != mine)
                        if held + ahead + nbytes <= self.limit:
                            index = mine if mine is not None else _free_row(live)
                            if index is not None:
                                ledger.write(index, ledger.pid, ledger.start, token, nbytes, 0)
                                mine = None
                                return Reservation(self, index, token, nbytes)
                        if mine is None and not ticket:
                            mine = _free_row(live)
                            if mine is not None:
                                ticket = ledger.next_ticket()
                                ledger.write(mine, ledger.pid, ledger.start, token, nbytes, ticket)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise self._busy()
                    self._changed.wait(min(POLL_S, remaining))
            finally:
                if mine is not None:  # gave up while waiting: leave the queue
                    with ledger.locked():
                        if ledger.row(mine)[:3] == (ledger.pid, ledger.start, token):
                            ledger.clear(mine)
                    self._changed.notify_all()

    def _grow(self, reservation: Reservation, extra: int, deadline: float) -> None:
        if reservation.nbytes + extra > self.limit:
            raise self.never_fits(reservation.nbytes + extra)
        self._check_fork()
        with self._changed:
            ledger = self._view()
            while True:
                with ledger.locked():
                    held = sum(n for _, _, n, t in ledger.sweep() if t == 0)
                    if held + extra <= self.limit:
                        reservation.nbytes += extra
                        ledger.write(reservation.index, ledger.pid, ledger.start, reservation.token,
                                     reservation.nbytes, 0)
                        return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._busy()
                self._changed.wait(min(POLL_S, remaining))

    def _shrink(self, reservation: Reservation, nbytes: int) -> None:
        self._check_fork()
        with self._changed:
            ledger = self._view()
            with ledger.locked():
                reservation.nbytes = nbytes
                ledger.write(reservation.index, ledger.pid, ledger.start, reservation.token, nbytes, 0)
            self._changed.notify_all()

    def _release(self, reservation: Reservation) -> None:
        if self._owner != os.getpid():
            return  # a forked child's copy: the row belongs to the parent
        with self._changed:
            ledger = self._view()
            with ledger.locked():
                if ledger.row(reservation.index)[:3] == (ledger.pid, ledger.start, reservation.token):
                    ledger.clear(reservation.index)
            self._changed.notify_all()

    def close(self) -> None:
        if self._ledger is not None and self._ledger.pid == os.getpid():
            self._ledger.close()
        self._ledger = None


def _free_row(live: list[tuple[int, int, int, int]]) -> int | None:
    used = {index for index, _, _, _ in live}
    return next((index for index in range(ROWS) if index not in used), None)


class Reservation:
    """Bytes held in the budget; a context manager. release() is idempotent."""

    def __init__(self, budget: MemoryBudget, index: int, token: int, nbytes: int) -> None:
        self.budget = budget
        self.index = index
        self.token = token
        self.nbytes = nbytes
        self.released = False
        self._lock = threading.Lock()

    def grow(self, extra: int, deadline: float) -> None:
        """Hold `extra` more bytes (a streamed body learning its size); waits like reserve()."""
        if self.released:
            raise RuntimeError("grow() on a released reservation")
        if extra > 0:
            self.budget._grow(self, int(extra), deadline)

    def shrink_to(self, nbytes: int) -> None:
        """Hold only `nbytes` from now on (never more than now): a body whose join is done
        gives back the chunks' copy."""
        if not self.released and 0 <= nbytes < self.nbytes:
            self.budget._shrink(self, int(nbytes))

    def release(self) -> None:
        with self._lock:
            if self.released:
                return
            self.released = True
        self.budget._release(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


# -- the default budget -----------------------------------------------------------------------


def _mem_total(root: str) -> int:
    for line in Path(root, "proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _mounts(root: str) -> list[tuple[str, str, str, str]]:
    """(root inside the hierarchy, mount point, fs type, super options) of each cgroup mount."""
    found = []
    for line in Path(root, "proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            found.append((fields[3], fields[4], tail[0], tail[2]))
    return found


def _limit_file(root: str, mount_point: str, path: str, name: str) -> int | None:
    """The smallest limit on `path` and its ancestors up to the mount point (a parent's
    limit binds its children too)."""
    best: int | None = None
    current = Path(path)
    while True:
        candidate = Path(root, mount_point.lstrip("/"), str(current).lstrip("/"), name)
        with contextlib.suppress(OSError, ValueError):
            text = candidate.read_text().strip()
            if text != "max" and int(text) < 1 << 60:  # v1 writes "no limit" as ~2^63
                best = int(text) if best is None else min(best, int(text))
        if current == current.parent:
            return best
        current = current.parent


def cgroup_memory_limit(root: str = "/") -> int | None:
    """This process's cgroup memory limit (v2 memory.max or v1 memory.limit_in_bytes), if any."""
    try:
        lines = Path(root, "proc/self/cgroup").read_text().splitlines()
        mounts = _mounts(root)
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for mount_root, mount_point, fstype, options in mounts:
            if controllers == "" and fstype == "cgroup2":
                name = "memory.max"
            elif "memory" in controllers.split(",") and fstype == "cgroup" and "memory" in options.split(","):
                name = "memory.limit_in_bytes"
            else:
                continue
            # A container's cgroup is often bind-mounted as the root of its hierarchy.
            inner = path
            if mount_root != "/":
                inner = path[len(mount_root):] if path.startswith(mount_root) else "/"
            limit = _limit_file(root, mount_point, inner or "/", name)
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def machine_memory(root: str = "/") -> int:
    """The memory this service may use at most: the cgroup limit if lower than the RAM."""
    total = _mem_total(root)
    limit = cgroup_memory_limit(root)
    return min(total, limit) if limit else total


def default_memory_budget(root: str = "/", fraction: float = DEFAULT_FRACTION) -> int:
    return int(machine_memory(root) * fraction)


def service_baseline(workers: int, embedded_redis_maxmemory: int | None) -> int:
    """Bytes the service holds with nothing in flight. `embedded_redis_maxmemory` is None when
    Redis runs elsewhere; 0 (no limit) counts as nothing, since it cannot be bounded."""
    redis_bytes = 0
    if embedded_redis_maxmemory:
        redis_bytes = int(embedded_redis_maxmemory * (1 + REDIS_OVERHEAD)) + REDIS_FIXED
    return MASTER_RSS + workers * IDLE_WORKER_RSS + redis_bytes


def service_budget(configured: int, workers: int, embedded_redis_maxmemory: int | None) -> tuple[int, int]:
    """(budget, baseline): IMAGE_PROXY_MEMORY_BUDGET when set (0 = derive it), else the default."""
    return configured or default_memory_budget(), service_baseline(workers, embedded_redis_maxmemory)


def process_budget(configured: int, workers: int, embedded_redis_maxmemory: int | None) -> MemoryBudget:
    """The budget a worker admits into: the master's ledger when gunicorn made one (LEDGER_ENV),
    else a private one for this process (create_app alone, tests), which is then the service."""
    path = os.environ.get(LEDGER_ENV)
    if path and os.path.exists(path):
        return MemoryBudget.from_ledger(path)
    return MemoryBudget(*service_budget(configured, workers, embedded_redis_maxmemory))
