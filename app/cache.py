"""Rendered images and failures in Redis, and the per-key render lock: the only Redis code.

A hit is one GET. A miss takes python-redis-lock's Lock on the key (expiring, renewed while
held); waiters block on the lock's signal list and, once they hold it or it is released,
read the stored entry: python-redis-lock's own anti-stampede recipe. Any Redis failure
becomes `CacheUnavailable`, which serve() turns into an uncached answer (X-Cache: BYPASS).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
import redis_lock
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger("image_proxy.cache")

_MAGIC = b"IPC1"
#: Waiters block on the lock's signal for at most this long between looks at the entry
#: and at their deadline; also bounds how soon a waiter notices a dead holder's expiry.
WAIT_STEP_S = 1
#: A wake-up nobody takes lapses quickly, as python-redis-lock's own (signal_expire=1000).
SIGNAL_EXPIRE_MS = 1000


class CacheUnavailable(Exception):
    """Redis did not answer in time, or not at all."""


@dataclass(frozen=True)
class CacheEntry:
    """A stored result: the image, or the failure to share with waiters for ERROR_TTL."""

    status: int
    body: bytes
    content_type: str
    etag: str = ""
    error: str = ""  # public message, for failures
    kind: str = ""  # error kind, for failures
    retry_after: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # sizes of source and output

    @property
    def ok(self) -> bool:
        return self.status == 200

    def to_bytes(self) -> bytes:
        header = asdict(self)
        del header["body"]
        head = json.dumps(header, separators=(",", ":")).encode()
        return _MAGIC + len(head).to_bytes(4, "big") + head + self.body

    @classmethod
    def from_bytes(cls, raw: bytes) -> CacheEntry | None:
        if raw[:4] != _MAGIC:
            return None
        size = int.from_bytes(raw[4:8], "big")
        try:
            header = json.loads(raw[8 : 8 + size])
        except ValueError:
            return None
        return cls(body=raw[8 + size :], **header)


def entry_key(key: str) -> str:
    # One hash tag for the entry and both lock keys: in a Redis Cluster they share a slot,
    # so the lock's release script (which touches lock and signal) never fails CROSSSLOT.
    return f"ip:{{{key}}}:v"


def lock_name(key: str) -> str:
    return f"ip:{{{key}}}"


def make_client(url: str, *, timeout: float, cluster: bool = False) -> Any:
    """A Redis client with short timeouts and no retries: each retry would be one more
    timeout before a request is served uncached (redis-py defaults: 5 s, 3 retries)."""
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


class Cache:
    def __init__(
        self,
        client: Any,
        wait_client: Any,
        *,
        ttl: int,
        error_ttl: int,
        lock_expire: int,
        max_entry_bytes: int,
        cluster: bool = False,
    ) -> None:
        self.client = client
        # Waiters block in BLPOP for WAIT_STEP_S; they need a socket timeout above that,
        # while every other command keeps the short one.
        self.wait_client = wait_client
        self.ttl = ttl
        self.error_ttl = error_ttl
        self.lock_expire = lock_expire
        self.max_entry_bytes = max_entry_bytes
        self.cluster = cluster
        self._healthy = True
        self._health_lock = threading.Lock()

    # -- health --------------------------------------------------------------------------

    def _failed(self, what: str, exc: Exception) -> CacheUnavailable:
        with self._health_lock:
            was_healthy, self._healthy = self._healthy, False
        if was_healthy:
            log.warning("redis unavailable during %s (%s); serving uncached until it answers", what, exc)
        return CacheUnavailable(f"{what}: {exc}")

    def _answered(self) -> None:
        if not self._healthy:
            with self._health_lock:
                was_healthy, self._healthy = self._healthy, True
            if not was_healthy:
                log.warning("redis answers again; caching resumed")

    def ping(self) -> None:
        try:
            self.client.ping()
        except (redis.RedisError, OSError) as exc:
            raise self._failed("ping", exc) from None
        self._answered()

    # -- entries -------------------------------------------------------------------------

    def get(self, key: str) -> CacheEntry | None:
        try:
            raw = self.client.get(entry_key(key))
        except (redis.RedisError, OSError) as exc:
            raise self._failed("get", exc) from None
        self._answered()
        return CacheEntry.from_bytes(raw) if raw else None

    def put(self, key: str, entry: CacheEntry) -> bool:
        """Store an entry; False when it was not stored (too large, or Redis failed)."""
        ttl = self.ttl if entry.ok else self.error_ttl
        if ttl <= 0 or len(entry.body) > self.max_entry_bytes:
            return False
        try:
            self.client.set(entry_key(key), entry.to_bytes(), ex=ttl)
        except (redis.RedisError, OSError) as exc:
            self._failed("set", exc)
            return False
        self._answered()
        return True

    # -- the per-key render lock ---------------------------------------------------------

    @contextmanager
    def render_lock(self, key: str, deadline: float) -> Iterator[CacheEntry | None]:
        """Hold the key's render lock, or wait for whoever holds it.

        Yields None while this caller holds the lock and must render, or the entry another
        caller stored while this one waited (the lock is then not held). Raises
        `LockWaitTimeout` when `deadline` (time.monotonic) passes first, and
        CacheUnavailable when Redis fails.
        """
        lock = redis_lock.Lock(
            self.wait_client,
            lock_name(key),
            expire=self.lock_expire,
            auto_renewal=True,
            strict=not self.cluster,
        )
        try:
            entry = self._acquire_or_entry(lock, key, deadline)
        except (redis.RedisError, OSError) as exc:
            raise self._failed("lock", exc) from None
        if entry is not None:
            yield entry
            return
        try:
            yield None
        finally:
            self._release(lock)

    def _acquire_or_entry(self, lock: redis_lock.Lock, key: str, deadline: float) -> CacheEntry | None:
        if lock.acquire(blocking=False):
            return None
        # Waiters block on the lock's own signal list, which its release pushes to, but do
        # not take the lock just to read the entry: a woken waiter that finds the entry
        # passes the wake-up on to two more and returns, so 31 waiters wake in about five
        # Redis round trips instead of a chain of 31 acquire/release pairs.
        signal = f"lock-signal:{lock_name(key)}"  # python-redis-lock 4.0's signal key
        while True:
            if time.monotonic() >= deadline:
                raise LockWaitTimeout("waited too long for another request's render")
            woken = self.wait_client.blpop([signal], timeout=WAIT_STEP_S)
            entry = self.get(key)
            if entry is not None:
                if woken:
                    self._wake_two(signal)
                return entry
            # No entry: the holder failed without storing, died, or is still at work.
            if lock.acquire(blocking=False):
                return None

    def _wake_two(self, signal: str) -> None:
        pipe = self.wait_client.pipeline(transaction=False)
        pipe.lpush(signal, 1, 1)
        pipe.pexpire(signal, SIGNAL_EXPIRE_MS)
        pipe.execute()

    def _release(self, lock: redis_lock.Lock) -> None:
        try:
            lock.release()
        except redis_lock.NotAcquired:
            # Expired or wiped (Redis restarted empty): waiters take over on their own.
            log.info("render lock was gone at release")
        except (redis.RedisError, OSError) as exc:
            self._failed("unlock", exc)


class LockWaitTimeout(Exception):
    """A waiter's deadline passed while another request held the render lock."""
