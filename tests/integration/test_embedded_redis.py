"""The embedded Redis: restarted on the same socket when it dies, stopped only by its owner.

Real redis-server processes, signalled by their own PIDs.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
import redis

from app import embedded_redis
from app.embedded_redis import EmbeddedRedis, EmbeddedRedisError, Supervisor, start_embedded_redis


@pytest.fixture
def server() -> Iterator[EmbeddedRedis]:
    started = start_embedded_redis(maxmemory=16 * 1024 * 1024)
    yield started
    started.stop()


def wait_for(condition, timeout: float) -> float:
    """Seconds until condition() is true; fails after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"not true within {timeout} s")


def answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False


def test_a_killed_server_is_restarted_on_the_same_socket_and_clients_reconnect(server):
    client = redis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    client.set("k", "v")
    supervisor = Supervisor(server, interval=0.05).start()
    try:
        old_pid, socket_path = server.pid, server.socket_path
        os.kill(old_pid, signal.SIGKILL)
        seconds = wait_for(lambda: supervisor.restarts == 1 and answers(client), timeout=10)
        print(f"answering again {seconds:.2f} s after SIGKILL")
        assert server.pid != old_pid and server.socket_path == socket_path
        assert supervisor.restarts == 1
        assert client.get("k") is None, "a new, empty cache"
        client.set("k", "again")  # the same client object works: it reconnected by itself
        assert client.get("k") == b"again"
    finally:
        supervisor.stop()
        client.close()


def test_a_stopped_supervisor_restarts_nothing(server):
    supervisor = Supervisor(server, interval=0.05).start()
    supervisor.stop()
    os.kill(server.pid, signal.SIGKILL)
    server.process.wait(5)
    time.sleep(0.3)
    assert supervisor.restarts == 0 and not server.running()


def test_a_forked_copy_cannot_stop_or_restart_the_owners_server(server):
    embedded_redis._owned = server  # as in a gunicorn master, whose workers inherit it
    try:
        child = os.fork()
        if child == 0:  # a worker: its exit (atexit, stop_owned) must leave the server alone
            code = 0
            try:
                embedded_redis.stop_owned()
                server.stop()
                try:
                    server.restart()
                    code = 3
                except EmbeddedRedisError:
                    pass
            except BaseException:
                code = 2
            os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.WEXITSTATUS(status) == 0
        assert server.running() and answers(redis.Redis.from_url(server.url))
        assert os.path.isdir(server.directory)
    finally:
        embedded_redis._owned = None
