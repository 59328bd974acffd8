"""The service's memory budget: one ledger of reserved bytes shared by every worker of a machine.

A request reserves bytes before it allocates them and releases them when done; what does
not fit waits, up to the request's deadline, then gets a 503 (`Busy`). A request that could
never fit, even alone, gets a 400 at once (`OverMemoryBudget`, naming
IMAGE_PROXY_MEMORY_BUDGET). The budget is for the whole service, not per worker, so one
48 MP render may use most of it while the other workers idle.

    budget    IMAGE_PROXY_MEMORY_BUDGET, or 80 % of the cgroup limit (v2 memory.max, v1
              memory.limit_in_bytes) or of MemTotal: the kernel must never OOM-kill first
    baseline  what the service uses with nothing in flight: the master, WORKERS idle workers
              and the embedded Redis's maxmemory (plus its overhead) when it is embedded
    limit     budget - baseline: what renders and bodies may reserve together

One reservation per miss. It starts, before the fetch, with the render's fixed part (the
encoder's contexts: `FIXED[format]` in app/render/estimate.py, known from the request alone),
grows as the body streams in, and grows to body + the render's estimated peak once the header
is read; it is released when the render is done. Starting with the fixed part keeps a burst
of misses from filling the limit with bodies none of whose renders then fits. Two kinds of
request wait for bytes:

- a **grower** already holds bytes (its body). It never queues behind anyone: it is admitted
  as soon as everything held plus its extra fits the limit. Making it wait behind others
  would keep its body out of everyone's reach while it waits, which is how one big render
  used to block every miss of the service; finishing it frees its bytes soonest.
- a **newcomer** holds nothing yet (`reserve`). It is admitted when it fits, except while a
  waiter has been waiting longer than PATIENCE_S (and longer than the newcomer) and would fit
  but for the requests admitted after it began waiting: then it waits until that waiter is
  in. So the held set drains and a big render is not starved by a stream of small ones; it
  waits at most PATIENCE_S plus the renders in flight. While the waiter is kept out by
  renders that started before it (another big one), newcomers pass: holding them back would
  not let it in any sooner, and small renders never wait behind a big one that cannot fit.

Two states in which a waiter's body keeps others out for long, broken by making it give way
(a 503, `Busy`, retry shortly, at once: it drops its body):
- several growers each hold a body, all bytes held are theirs, and none fits (five 48 MP w=0
  AVIFs, each holding a 25 MB body and wanting 1.3 GB of a 1.4 GB limit): nothing would
  change until their deadlines. The youngest give way, one by one, until the oldest fits.
- a grower waits behind another big render (one holding more than half the limit, seconds
  long), and its body is what keeps another waiter out (thumbnails beside the running big
  render): it gives way, so small renders never wait behind a big one that cannot fit yet.
  Behind smaller renders it keeps its place: they finish soon, and patience protects it.

Invariants: the bytes held never exceed the limit; release is idempotent; a dead process's
rows are freed without its help.

The ledger is a small file (one per service, in a private 0700 directory the gunicorn master
makes before forking and names in LEDGER_ENV), mmap'd by every worker: a versioned header
(budget, baseline, row count, patience) and a table of rows (pid, process start time, token,
bytes held, bytes wanted, waiting since), each change made under `fcntl.flock`. The master
sizes the table from the settings (`ledger_rows`: WORKERS x THREADS x 2 plus a margin, more
than the requests that can be in flight). Rows whose process is gone (SIGKILLed,
OOM-killed, recycled) are reclaimed by the next reader: the pid is checked with its start
time, so a reused pid does not keep a dead worker's bytes alive, and a zombie counts as dead.
"Waiting since" is CLOCK_MONOTONIC, one clock for all processes of the machine. Local
waiters wake at once on a local release (a Condition); waiters in other processes poll
every POLL_S.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import itertools
import mmap
import os
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

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
#: How long a waiter may be passed by newcomers before they wait for it instead. Long enough
#: that a big render arriving in a burst of thumbnails lets the burst through first (they
#: take well under a second each); short against the 30 s request budget, so the big one
#: still has time to render once the renders already in flight are done.
PATIENCE_S = 2.0
#: Rows beyond WORKERS x THREADS x 2: room for the admin routes and a recycled worker's
#: replacement starting while the old one still finishes its requests.
ROW_MARGIN = 64

_MAGIC = b"IPML"
_VERSION = 2
# magic, version, rows, budget bytes, baseline bytes, patience (ns)
_HEADER = struct.Struct("<4sIqqqq")
# pid, start time, token, bytes held, bytes wanted, waiting since (monotonic ns; 0: not
# waiting), admitted at (monotonic ns; 0: not yet)
_ROW = struct.Struct("<qqqqqqq")
_COLUMNS = 7


def ledger_rows(workers: int, threads: int) -> int:
    """Rows for a service of `workers` x `threads`: each thread holds at most one reservation
    at a time; twice that leaves room for a worker's replacement and any second holder."""
    return workers * threads * 2 + ROW_MARGIN


DEFAULT_ROWS = ledger_rows(2, 64)  # the default settings (WORKERS 2, THREADS 64)


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


@dataclass(frozen=True)
class LedgerHeader:
    budget: int
    baseline: int
    rows: int
    patience_s: float


def create_ledger(
    budget_bytes: int, baseline_bytes: int, directory: str | None = None, *, rows: int = DEFAULT_ROWS,
    patience_s: float = PATIENCE_S,
) -> str:
    """Make a ledger of `rows` rows in a new private directory and return its path (the
    master's job; it passes `ledger_rows(WORKERS, THREADS)`)."""
    if rows < 1:
        raise ValueError("a ledger needs at least one row")
    private = tempfile.mkdtemp(prefix="image-proxy-memory-", dir=directory)  # mode 0700
    path = os.path.join(private, "ledger")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, _HEADER.size + rows * _ROW.size)
        header = _HEADER.pack(_MAGIC, _VERSION, rows, budget_bytes, baseline_bytes, int(patience_s * 1e9))
        os.pwrite(fd, header, 0)
    finally:
        os.close(fd)
    return path


def remove_ledger(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))


def read_ledger_header(path: str) -> LedgerHeader:
    with open(path, "rb") as file:
        raw = file.read(_HEADER.size)
    if len(raw) < _HEADER.size or raw[:4] != _MAGIC:
        raise ValueError(f"{path} is not an image-proxy memory ledger")
    _, version, rows, budget, baseline, patience_ns = _HEADER.unpack(raw)
    if version != _VERSION:
        raise ValueError(f"{path} is a version {version} memory ledger; this code reads version {_VERSION}")
    return LedgerHeader(budget, baseline, rows, patience_ns / 1e9)


def read_ledger_budget(path: str) -> tuple[int, int]:
    """(budget, baseline) as the master wrote them."""
    header = read_ledger_header(path)
    return header.budget, header.baseline


class _Row(NamedTuple):
    index: int
    token: int
    held: int
    want: int  # bytes waited for (0: not waiting for bytes)
    since: int  # monotonic ns the wait began (0: not waiting)
    admitted: int = 0  # monotonic ns the request got in (0: not yet)


class _Ledger:
    """One process's view of the file: its own descriptor (flock is per open file, so a
    descriptor inherited across fork would not exclude the parent) and mapping."""

    def __init__(self, path: str, rows: int) -> None:
        self.pid = os.getpid()
        self.start = process_start(self.pid) or 0
        self.rows = rows
        self.size = _HEADER.size + rows * _ROW.size
        self.fd = os.open(path, os.O_RDWR)
        self.map = mmap.mmap(self.fd, self.size)
        self.free: int | None = None  # the first free row, as the last sweep saw it

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def owns(self, index: int, token: int) -> bool:
        return _ROW.unpack_from(self.map, _HEADER.size + index * _ROW.size)[:3] == (self.pid, self.start, token)

    def write(self, row: _Row) -> None:
        offset = _HEADER.size + row.index * _ROW.size
        _ROW.pack_into(self.map, offset, self.pid, self.start, row.token, row.held, row.want, row.since, row.admitted)

    def clear(self, index: int) -> None:
        _ROW.pack_into(self.map, _HEADER.size + index * _ROW.size, 0, 0, 0, 0, 0, 0, 0)

    def _alive(self, pid: int, start: int) -> bool:
        return (pid == self.pid and start == self.start) or process_start(pid) == start

    def sweep(self) -> Table:
        """Free dead processes' rows; sum up the live ones and note the first free row."""
        # Column by column at C speed: the table has a row for every thread of the service
        # (thousands at large settings), and waiters sweep it every POLL_S holding the GIL
        # while a cache hit in the same worker may be waiting for it.
        table = memoryview(self.map[_HEADER.size : self.size]).cast("q")
        pids = table[0::_COLUMNS].tolist()
        starts = table[1::_COLUMNS].tolist()
        dead = {key for key in set(zip(pids, starts, strict=True)) - {(0, 0)} if not self._alive(*key)}
        if dead:
            for index, key in enumerate(zip(pids, starts, strict=True)):
                if key in dead:
                    self.clear(index)
                    pids[index] = 0
        self.free = pids.index(0) if 0 in pids else None
        live = list(itertools.compress(range(self.rows), pids))
        helds = table[3::_COLUMNS].tolist()
        sinces = table[5::_COLUMNS].tolist()

        def row(index: int) -> _Row:
            base = index * _COLUMNS
            return _Row(index, table[base + 2], helds[index], table[base + 4], sinces[index], table[base + 6])

        return Table(
            waiting=[row(index) for index in live if sinces[index]],
            holding=[row(index) for index in live if helds[index]],
            count=len(live),
        )

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


# -- who gets in ------------------------------------------------------------------------------

ADMIT, WAIT, GIVE_WAY = "admit", "wait", "give way"


class Table(NamedTuple):
    """What a decision needs from the ledger's live rows."""

    waiting: list[_Row]  # the rows waiting now
    holding: list[_Row]  # the rows holding bytes now (a waiting grower is in both)
    count: int  # live rows

    @property
    def held(self) -> int:
        return sum(row.held for row in self.holding)

    @property
    def running(self) -> int:
        """Bytes held by requests that are not waiting: they will be released."""
        return sum(row.held for row in self.holding if not row.since)


def table_of(rows: list[_Row]) -> Table:
    return Table([row for row in rows if row.since], [row for row in rows if row.held], len(rows))


def verdict(table: Table, me: _Row, limit: int, now: int, patience_ns: int, *, newcomer: bool) -> str:
    """What `me` does now: its row is in `table` once it waits (index -1 while a newcomer
    has none). Pure, so each rule is testable on its own."""
    if newcomer and any(_held_up_by_later(table, row, limit) for row in _starving(table, me, now, patience_ns)):
        return WAIT  # let the requests that came after that waiter drain for it
    # My row, if I have one, holds what I hold: count it once.
    others = table.held - (me.held if me.index >= 0 else 0)
    if others + me.held + me.want <= limit:
        return ADMIT
    if not newcomer and (me.index in _giving_way(table, limit) or _in_the_way(table, me, limit)):
        return GIVE_WAY
    return WAIT


def _in_the_way(table: Table, me: _Row, limit: int) -> bool:
    """Is `me` waiting behind another big render (one holding more than half the limit, which
    may run for many seconds, and beside which `me` cannot fit) while holding bytes another
    waiter could get in with? Then small renders would wait behind a big one that cannot fit
    yet: it gives way. Behind smaller renders it keeps its place (they finish soon, and
    PATIENCE_S holds newcomers back for it)."""
    if not me.held or not any(row.index == me.index for row in table.waiting):
        return False
    if not any(
        not row.since and row.index != me.index and row.held * 2 > limit and row.held + me.held + me.want > limit
        for row in table.holding
    ):
        return False
    return any(
        row.index != me.index and row.want and table.held + row.want > limit >= table.held - me.held + row.want
        for row in table.waiting
    )


def _starving(table: Table, me: _Row, now: int, patience_ns: int) -> list[_Row]:
    """The waiters that began waiting before `me` and have run out of patience."""
    return [
        row for row in table.waiting
        if row.index != me.index and row.want and row.since < me.since and now - row.since > patience_ns
    ]


def _held_up_by_later(table: Table, waiter: _Row, limit: int) -> bool:
    """Would `waiter` fit but for the requests admitted after it began waiting? Only then do
    newcomers wait for it: while it is blocked by renders that started before it (another big
    render), holding newcomers back would not let it in any sooner."""
    earlier = sum(row.held for row in table.holding if row.index != waiter.index and row.admitted < waiter.since)
    return earlier + waiter.held + waiter.want <= limit


def _giving_way(table: Table, limit: int) -> set[int]:
    """The waiters that must give their bytes up so the oldest waiter fits, when nothing
    else would ever free them: every byte held is a waiter's and no waiter fits."""
    waiting = [row for row in table.waiting if row.want]
    held = table.held
    if not waiting or table.running:
        return set()  # a running holder will free its bytes
    if any(held + row.want <= limit for row in waiting):
        return set()  # that one gets in at its next look and then finishes
    oldest = min(waiting, key=lambda row: (row.since, row.index))
    giving: set[int] = set()
    for row in sorted(waiting, key=lambda row: (row.since, row.index), reverse=True):
        if held + oldest.want <= limit:
            break
        if row is not oldest and row.held:
            giving.add(row.index)
            held -= row.held
    return giving


# -- the budget ------------------------------------------------------------------------------


class MemoryBudget:
    """Admits reservations of bytes within `total_bytes - baseline_bytes`, for all processes
    that open the same ledger. Thread-safe; survives fork (a child reopens the file).
    Without `ledger_path` it makes its own ledger of `rows` rows (the process is the service)."""

    def __init__(
        self, total_bytes: int, baseline_bytes: int, ledger_path: str | None = None, *, rows: int = DEFAULT_ROWS,
        patience_s: float = PATIENCE_S,
    ) -> None:
        self.total = total_bytes
        self.baseline = baseline_bytes
        self.limit = max(0, total_bytes - baseline_bytes)
        if ledger_path is None:
            # Outside gunicorn (tests, create_app alone) the process is the whole service.
            ledger_path = create_ledger(total_bytes, baseline_bytes, rows=rows, patience_s=patience_s)
        header = read_ledger_header(ledger_path)
        self.rows = header.rows
        self.patience_s = header.patience_s
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
            self._ledger = _Ledger(self.ledger_path, self.rows)
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
                return ledger.sweep().held

    def available(self) -> int:
        return max(0, self.limit - self.in_use())

    def reservations(self) -> int:
        """Rows in use: reservations held or waiting, in every process."""
        return self._table().count

    def waiting(self) -> list[tuple[int, int]]:
        """(bytes held, bytes wanted) of each request waiting for bytes now, in every process."""
        return [(row.held, row.want) for row in self._table().waiting if row.want]

    def _table(self) -> Table:
        self._check_fork()
        with self._changed:
            ledger = self._view()
            with ledger.locked():
                return ledger.sweep()

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
        """Hold `nbytes` (0 at the start of a miss) until released; wait until `deadline`
        (time.monotonic) for room, as a newcomer (module docstring: it may wait for a waiter
        that ran out of patience).

        OverMemoryBudget (400) at once if it can never fit; Busy (503) at the deadline.
        """
        nbytes = max(0, int(nbytes))
        if nbytes > self.limit:
            raise self.never_fits(nbytes)
        self._check_fork()
        with self._changed:
            self._tokens += 1
            token = self._tokens
            index, admitted = self._admit(_Row(-1, token, 0, nbytes, 0), deadline)
            return Reservation(self, index, token, nbytes, admitted)

    def _grow(self, reservation: Reservation, extra: int, deadline: float) -> None:
        if reservation.nbytes + extra > self.limit:
            raise self.never_fits(reservation.nbytes + extra)
        self._check_fork()
        with self._changed:
            mine = _Row(reservation.index, reservation.token, reservation.nbytes, extra, 0, reservation.admitted)
            self._admit(mine, deadline)
            reservation.nbytes += extra

    def _admit(self, me: _Row, deadline: float) -> tuple[int, int]:
        """Wait (holding self._changed) until `me.want` more bytes are admitted beside
        `me.held`; return the row and when the request got in. A newcomer (index -1) has no
        row until it waits or is in."""
        ledger = self._view()
        newcomer = me.index < 0
        patience_ns = int(self.patience_s * 1e9)
        try:
            while True:
                with ledger.locked():
                    now = time.monotonic_ns()
                    table = ledger.sweep()
                    decided = verdict(table, me._replace(since=me.since or now), self.limit, now, patience_ns,
                                      newcomer=newcomer)
                    if decided == GIVE_WAY:
                        raise Busy(
                            "this image gave its share of the memory budget to an older render that "
                            "was waiting for it; retry shortly", retry_after=2,
                        )
                    if me.index < 0 and ledger.free is not None:
                        me = me._replace(index=ledger.free)
                    if me.index >= 0:
                        if decided == ADMIT:
                            waited = me.since
                            me = me._replace(held=me.held + me.want, want=0, since=0, admitted=me.admitted or now)
                            ledger.write(me)
                            if waited:
                                self._changed.notify_all()  # a waiter got in: the newcomer gate may lift
                            return me.index, me.admitted
                        if not me.since:
                            me = me._replace(since=now)
                            ledger.write(me)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._busy()
                self._changed.wait(min(POLL_S, remaining))
        finally:
            if me.since:  # gave up while waiting: stop waiting
                with ledger.locked():
                    if ledger.owns(me.index, me.token):
                        if newcomer:
                            ledger.clear(me.index)
                        else:
                            ledger.write(me._replace(want=0, since=0))
                self._changed.notify_all()

    def _shrink(self, reservation: Reservation, nbytes: int) -> None:
        self._check_fork()
        with self._changed:
            ledger = self._view()
            with ledger.locked():
                reservation.nbytes = nbytes
                ledger.write(_Row(reservation.index, reservation.token, nbytes, 0, 0, reservation.admitted))
            self._changed.notify_all()

    def _release(self, reservation: Reservation) -> None:
        if self._owner != os.getpid():
            return  # a forked child's copy: the row belongs to the parent
        with self._changed:
            ledger = self._view()
            with ledger.locked():
                if ledger.owns(reservation.index, reservation.token):
                    ledger.clear(reservation.index)
            self._changed.notify_all()

    def close(self) -> None:
        if self._ledger is not None and self._ledger.pid == os.getpid():
            self._ledger.close()
        self._ledger = None


class Reservation:
    """Bytes held in the budget; a context manager. release() is idempotent."""

    def __init__(self, budget: MemoryBudget, index: int, token: int, nbytes: int, admitted: int = 0) -> None:
        self.budget = budget
        self.index = index
        self.token = token
        self.nbytes = nbytes
        self.admitted = admitted  # monotonic ns it got in
        self.released = False
        self._lock = threading.Lock()

    def grow(self, extra: int, deadline: float) -> None:
        """Hold `extra` more bytes: a streamed body learning its size, or the render's
        estimated peak beside the body. Admitted as soon as it fits, never behind other
        waiters (this request already holds bytes, and finishing it frees them soonest);
        Busy at `deadline`, or at once when it must give way (module docstring);
        OverMemoryBudget at once when the total could never fit."""
        if self.released:
            raise RuntimeError("grow() on a released reservation")
        if extra > 0:
            self.budget._grow(self, int(extra), deadline)

    def grow_to(self, nbytes: int, deadline: float) -> None:
        """Hold at least `nbytes` in all (nothing to do if it already does); waits like grow()."""
        self.grow(nbytes - self.nbytes, deadline)

    def shrink_to(self, nbytes: int) -> None:
        """Hold only `nbytes` from now on (never more than now): a body whose join is done
        gives back the chunks' copy, a finished render gives back its peak."""
        if not self.released and 0 <= nbytes < self.nbytes:
            self.budget._shrink(self, int(nbytes))

    def release(self) -> None:
        with self._lock:
            if self.released:
                return
            self.released = True
        if self.nbytes >= TRIM_ABOVE:
            # The ledger is about to say these bytes are free: make that true for the kernel.
            give_back_to_os()
        self.budget._release(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


#: A reservation this large, when released, hands glibc's freed heap back to the kernel.
#: glibc keeps freed memory for reuse (its mmap threshold grows past image-sized buffers after
#: the first free), so a worker that rendered one 48 MP image kept ~1 GB resident that the
#: ledger counted as free: the hostile mix peaked at 2,075 MB of a 2,048 MB budget (2,039 and
#: 2,071 MB with this trim). Trimming from 32 MB up held it better but cost ordinary renders
#: 20-30 % more CPU (every 640 px AVIF re-faulted its memory: 152 against 117 CPU ms an image;
#: BENCHMARKS.md), so only renders of 128 MB or more trim.
TRIM_ABOVE = 128 * 1024 * 1024
_libc: ctypes.CDLL | bool | None = None


def give_back_to_os() -> None:
    """malloc_trim(0): return free heap pages of every arena to the kernel (glibc only)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 (the attribute lookup is the check)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)  # type: ignore[union-attr]


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


def process_budget(
    configured: int, workers: int, embedded_redis_maxmemory: int | None, threads: int = 64
) -> MemoryBudget:
    """The budget a worker admits into: the master's ledger when gunicorn made one (LEDGER_ENV),
    else a private one for this process (create_app alone, tests), which is then the service,
    sized from the same settings as the master's."""
    path = os.environ.get(LEDGER_ENV)
    if path and os.path.exists(path):
        return MemoryBudget.from_ledger(path)
    return MemoryBudget(*service_budget(configured, workers, embedded_redis_maxmemory),
                        rows=ledger_rows(workers, threads))
