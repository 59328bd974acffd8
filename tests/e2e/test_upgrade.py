"""Upgrade under load: change the code of a running service and send HUP (`systemctl reload`);
the new workers serve the new code and no request fails.

The service runs from a copy of the project, so the test can edit it. The edit is in
app/__init__.py (`__version__`, sent as X-Image-Proxy-Version), a module the gunicorn
master itself has loaded: if workers inherited the master's modules, the old version would
keep answering. Clients retry only what HTTP lets any client retry by itself: a GET whose
connection was closed before a single response byte arrived (RFC 9110 section 9.2.2; nginx's
proxy_next_upstream and browsers do the same on reused keep-alive connections). A response
that started and broke off, a 5xx, or a wrong length counts as a failure.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from tests.conftest import ROOT, Gunicorn, free_port, gunicorn_env

pytestmark = pytest.mark.e2e

PHOTO = "photos/portrait_1200x1800.jpg"
OLD, NEW = "1.0.0", "2.0.0-upgrade-test"
CLIENTS = 4
MAX_REQUESTS = 3000  # bounds of the load: whichever comes first
MAX_SECONDS = 90.0


def copy_project(destination: Path) -> Path:
    """The project's files as `git clone` of the working tree would give them, uncommitted
    edits included (tracked and untracked files, .gitignore honoured)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True, timeout=60,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def _closed_before_any_byte(exc: requests.ConnectionError) -> bool:
    """The server closed a (kept-alive) connection before answering: nothing was received.

    requests wraps urllib3's ProtocolError("Connection aborted.", RemoteDisconnected(...)):
    look through the causes and the exception arguments for that, or a reset before reading.
    """
    todo: list[object] = [exc]
    seen = 0
    while todo and seen < 20:
        cause = todo.pop()
        seen += 1
        if isinstance(cause, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError):
            return True
        if isinstance(cause, BaseException):
            todo.extend([cause.__cause__, cause.__context__, *cause.args])
    return False


@dataclass
class Load:
    urls: list[str]
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    versions: list[tuple[float, str]] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    retries: int = 0
    sent: int = 0

    def client(self, index: int) -> None:
        with requests.Session() as session:
            position = index
            while not self.stop.is_set():
                with self.lock:
                    if self.sent >= MAX_REQUESTS:
                        return
                    self.sent += 1
                url = self.urls[position % len(self.urls)]
                position += CLIENTS
                self._one(session, url)

    def _one(self, session: requests.Session, url: str) -> None:
        for attempt in (1, 2):
            try:
                response = session.get(url, timeout=60)
            except requests.ConnectionError as exc:
                if attempt == 1 and _closed_before_any_byte(exc):
                    with self.lock:
                        self.retries += 1
                    continue
                self._fail(f"{url}: {exc!r}")
                return
            except requests.RequestException as exc:  # a body cut short, a timeout
                self._fail(f"{url}: {exc!r}")
                return
            with self.lock:
                self.statuses[response.status_code] += 1
                self.cache[response.headers.get("X-Cache", "")] += 1
                self.versions.append((time.monotonic(), response.headers.get("X-Image-Proxy-Version", "")))
            if response.status_code != 200 or len(response.content) != int(response.headers["Content-Length"]):
                self._fail(f"{url}: {response.status_code} {response.text[:200]!r}")
            return

    def _fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)


def test_hup_under_load_loads_new_code_with_zero_failed_requests(tmp_path, upstream):
    clone = copy_project(tmp_path / "clone")
    port = free_port()
    server = Gunicorn(
        gunicorn_env(bind=f"127.0.0.1:{port}", allow_networks="127.0.0.0/8", workers="2", threads="16",
                     max_queue="12"),
        port, tmp_path / "gunicorn.log", cwd=clone,
    ).start()
    try:
        source = quote(upstream.url(PHOTO), safe="")
        hits = [f"{server.base}/image?url={source}&w={w}" for w in (64, 96, 128)]
        for url in hits:  # warm: these are cache hits from now on
            assert requests.get(url, timeout=60).status_code == 200
        misses = [f"{server.base}/image?url={source}&w={w}" for w in range(40, 40 + MAX_REQUESTS)]
        # Two hits for every miss, interleaved, so both paths are in flight at the HUP.
        urls = [url for i, miss in enumerate(misses) for url in (miss, hits[i % 3], hits[(i + 1) % 3])]
        old_workers = set(server.workers())
        redis_pid = server.embedded_redis_pid()
        assert requests.get(hits[0], timeout=30).headers["X-Image-Proxy-Version"] == OLD

        load = Load(urls)
        threads = [threading.Thread(target=load.client, args=(i,), daemon=True) for i in range(CLIENTS)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(2.0)  # load under way on the old version

        init = clone / "app" / "__init__.py"
        init.write_text(init.read_text().replace(f'__version__ = "{OLD}"', f'__version__ = "{NEW}"'))
        assert NEW in init.read_text()
        hup_at = time.monotonic()
        os.kill(server.process.pid, signal.SIGHUP)

        # Keep the load on until the new version has answered for a while (bounded).
        give_up = started + MAX_SECONDS
        while time.monotonic() < give_up:
            with load.lock:
                new_since = [t for t, version in load.versions if version == NEW]
            if new_since and time.monotonic() - new_since[0] > 5.0:
                break
            time.sleep(0.2)
        load.stop.set()
        for thread in threads:
            thread.join(90)
        assert not any(thread.is_alive() for thread in threads)

        summary = (f"{sum(load.statuses.values())} responses {dict(load.statuses)}, cache {dict(load.cache)}, "
                   f"{load.retries} retried before any byte, failures: {load.failures[:5]}")
        print(summary)
        assert load.failures == [], summary
        before = Counter(version for t, version in load.versions if t < hup_at)
        assert before[OLD] > 0 and before[NEW] == 0, "the old version served until the HUP"
        last = [version for _, version in load.versions[-50:]]
        assert set(last) == {NEW}, f"after the reload only new workers answer: {Counter(last)}"
        assert load.cache["HIT"] > 0 and load.cache["MISS"] > 0, "both hits and misses were in flight"
        assert not old_workers & set(server.workers()), "every worker was replaced"
        assert server.embedded_redis_pid() == redis_pid, "HUP keeps the master and its embedded Redis"
        assert requests.get(hits[0], timeout=30).headers["X-Cache"] == "HIT", "the cache survived the reload"
        assert server.process.poll() is None
    finally:
        assert server.stop() == 0, server.log()
