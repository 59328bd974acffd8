"""Keep PROMETHEUS_MULTIPROC_DIR bounded: fold dead workers' metric files into archives.

prometheus_client's multiprocess mode gives every worker its own files (`counter_<pid>.db`,
`histogram_<pid>.db`, `gauge_<mode>_<pid>.db`, ...), and `mark_process_dead` removes only
the live-gauge ones: with `max_requests` recycling, every worker that ever lived keeps its
files, and each scrape reads them all. Deleting them would make counters go backwards.

So the gunicorn master, in `child_exit`, calls `archive_dead_workers`: every file of a pid
that is neither a live worker nor a running process is added, key by key, into one archive
file per type (`counter_archive.db`, `histogram_archive.db`, `summary_archive.db`,
`gauge_<mode>_archive.db`), then removed. The directory then holds the live workers' files
plus at most one archive per type, and every total stays where it was.

How each type is combined is what the collector does when it reads several files: counters,
histogram buckets and sums, summaries and `sum` gauges add; `min`/`max` gauges keep the
extreme; `mostrecent` keeps the newest. Gauges in `all` mode are per pid, so a dead pid's
value means nothing and is dropped; `live*` gauges are already removed by mark_process_dead.

A scrape must not see a half-done fold (the dead file and the archive that already holds it,
or neither): `LockedMultiProcessCollector` reads under a shared flock on `.archive.lock`, and
the fold runs under the exclusive lock. The master never blocks on a scrape: it tries the
lock without waiting for a short while and otherwise leaves the files for the next exit.

Imports only the standard library and prometheus_client: the gunicorn master loads it and
must not import the Flask app.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Collection, Iterator
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

LOCK_NAME = ".archive.lock"
ARCHIVE = "archive"
_PID_FILE = re.compile(r"(?P<kind>counter|histogram|summary|gauge_[a-z]+)_(?P<pid>[0-9]+)\.db")

# (value, timestamp) pairs for one key, combined per gauge mode; everything else adds.
Entry = tuple[float, float]


def _combine(kind: str, old: Entry, new: Entry) -> Entry:
    mode = kind.removeprefix("gauge_") if kind.startswith("gauge_") else "sum"
    if mode == "min":
        return min(old, new, key=lambda entry: entry[0])
    if mode == "max":
        return max(old, new, key=lambda entry: entry[0])
    if mode == "mostrecent":
        return max(old, new, key=lambda entry: entry[1])
    return (old[0] + new[0], max(old[1], new[1]))


@contextlib.contextmanager
def _locked(directory: Path, mode: int, wait: float | None) -> Iterator[bool]:
    """Hold the archive lock in `mode`; wait None blocks, else try for `wait` seconds.
    Yields whether the lock is held."""
    with open(directory / LOCK_NAME, "a+b") as lock_file:
        give_up = None if wait is None else time.monotonic() + wait
        while True:
            try:
                fcntl.flock(lock_file, mode | (0 if give_up is None else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if give_up is None or time.monotonic() > give_up:
                    yield False
                    return
                time.sleep(0.01)
        try:
            yield True
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, not ours to fold
    return True


def dead_files(directory: Path, live_pids: Collection[int]) -> list[tuple[Path, str]]:
    """(file, kind) for every per-pid metric file whose process is gone."""
    found = []
    for path in directory.glob("*.db"):
        match = _PID_FILE.fullmatch(path.name)
        if match is None:
            continue
        pid = int(match["pid"])
        if pid not in live_pids and not _alive(pid):
            found.append((path, match["kind"]))
    return found


def _fold(directory: Path, kind: str, files: list[Path]) -> None:
    archive = directory / f"{kind}_{ARCHIVE}.db"
    entries: dict[str, Entry] = {}
    for path in ([archive] if archive.exists() else []) + files:
        for key, value, timestamp, _position in MmapedDict.read_all_values_from_file(str(path)):
            entry = (value, timestamp)
            entries[key] = _combine(kind, entries[key], entry) if key in entries else entry
    # Written aside and renamed in, so a crash never leaves a half-written archive; the name
    # does not end in .db, so no collector reads it meanwhile.
    partial = directory / f"{kind}_{ARCHIVE}.db.partial"
    partial.unlink(missing_ok=True)
    target = MmapedDict(str(partial))
    try:
        for key, (value, timestamp) in entries.items():
            target.write_value(key, value, timestamp)
    finally:
        target.close()
    os.replace(partial, archive)


def archive_dead_workers(directory: str | os.PathLike[str], live_pids: Collection[int], wait: float = 0.5) -> int:
    """Fold every dead process's metric files into the archives; return how many were removed.

    `live_pids` are the workers the master still has (a fresh worker's pid may not have
    files yet, and must keep them). Returns 0 without touching anything when a scrape holds
    the lock for longer than `wait`: the next call folds those files too.
    """
    path = Path(directory)
    with _locked(path, fcntl.LOCK_EX, wait) as held:
        if not held:
            return 0
        by_kind: dict[str, list[Path]] = {}
        for file, kind in dead_files(path, live_pids):
            by_kind.setdefault(kind, []).append(file)
        removed = 0
        for kind, files in by_kind.items():
            if kind.startswith("gauge_live"):
                pass  # mark_process_dead's job, done here too for pids it never saw
            elif kind != "gauge_all":
                _fold(path, kind, files)
            for file in files:
                file.unlink(missing_ok=True)
                removed += 1
        return removed


def on_child_exit(worker_pid: int, live_pids: Collection[int], directory: str | None = None) -> int:
    """The gunicorn `child_exit` hook's whole job for metrics."""
    directory = directory or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory or not os.path.isdir(directory):
        return 0
    mark_process_dead(worker_pid, directory)
    return archive_dead_workers(directory, live_pids)


class LockedMultiProcessCollector(MultiProcessCollector):
    """MultiProcessCollector that reads while no fold is half done (see the module doc)."""

    def collect(self):  # type: ignore[no-untyped-def]
        with _locked(Path(self._path), fcntl.LOCK_SH, None):
            return list(super().collect())


if __name__ == "__main__":
    # The gunicorn master runs this as a short child process (gunicorn.conf.py, child_exit),
    # so prometheus_client is never imported into the master and from there into workers.
    import sys

    on_child_exit(int(sys.argv[1]), [int(pid) for pid in sys.argv[2:]])
