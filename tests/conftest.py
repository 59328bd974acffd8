"""Shared fixtures: a real redis-server, a real loopback upstream, the app and its client."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from app.embedded_redis import EmbeddedRedis, start_embedded_redis
from app.factory import create_app
from app.settings import Settings
from tests import processes
from tests.upstream import Upstream, corpus_dir

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


@pytest.fixture(scope="session")
def corpus() -> Path:
    return corpus_dir()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    server = start_embedded_redis(maxmemory=512 * 1024 * 1024)
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[Upstream]:
    server = Upstream().start()
    yield server
    server.stop()


@pytest.fixture
def upstream(upstream_server: Upstream) -> Upstream:
    upstream_server.reset()
    return upstream_server


@pytest.fixture
def settings(redis_server: EmbeddedRedis, redis_client: redis.Redis) -> Settings:
    # Loopback is allowed because the test upstream lives there; the guard's refusals of
    # loopback are tested with their own settings.
    return Settings(
        redis_url=redis_server.url,
        allow_networks=LOOPBACK,
        upstream_timeout=3.0,
        request_budget=10.0,
    )


@pytest.fixture
def app(settings: Settings):
    application = create_app(settings)
    application.config.update(TESTING=True)
    yield application
    application.extensions["image_proxy"].fetcher.close()


@pytest.fixture
def client(app):
    return app.test_client()


# -- real gunicorn ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Gunicorn:
    """A real gunicorn master started from the project's gunicorn.conf.py; stopped by PID."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path, cwd: Path = ROOT) -> None:
        self.cwd = cwd  # a copy of the project (tests/e2e/test_upgrade.py) or the project itself
        self.port = port
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Gunicorn:
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child's lifetime)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(self.base + "/healthz", timeout=1).status_code in (200, 503):
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def workers(self) -> list[int]:
        assert self.process is not None
        return [pid for pid in processes.children(self.process.pid) if not processes.is_redis(pid)]

    def embedded_redis_pid(self) -> int | None:
        assert self.process is not None
        return next((pid for pid in processes.children(self.process.pid) if processes.is_redis(pid)), None)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return self.process.returncode


def gunicorn_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGE_PROXY_", "PROMETHEUS_"))}
    env.update({f"IMAGE_PROXY_{k.upper()}": v for k, v in settings.items()})
    return env


@pytest.fixture
def start_gunicorn(tmp_path: Path):
    started: list[Gunicorn] = []

    def start(**settings: str) -> Gunicorn:
        port = free_port()
        settings.setdefault("bind", f"127.0.0.1:{port}")
        settings.setdefault("allow_networks", "127.0.0.0/8")
        server = Gunicorn(gunicorn_env(**settings), port, tmp_path / f"gunicorn-{port}.log")
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


# -- headless Chromium (tests/chromium.py) -------------------------------------------------


@pytest.fixture(scope="session")
def chromium_binary() -> str:
    """Debian's chromium, installed with apt-get on first use; a skip says why if impossible."""
    from tests.chromium import ChromiumUnavailable, ensure_chromium

    try:
        return ensure_chromium()
    except ChromiumUnavailable as exc:
        pytest.skip(f"headless Chromium unavailable: {exc}")


@pytest.fixture
def chromium(chromium_binary: str, tmp_path: Path):
    """A started headless Chromium on a fresh profile; stopped by PID after the test."""
    from tests.chromium import Chromium

    browser = Chromium(chromium_binary, tmp_path / "chromium-profile").start()
    yield browser
    browser.stop()
