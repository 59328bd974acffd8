"""Rendered images and failures in Redis, and the per-key render claim: the only Redis code.

A hit is one GET. A miss claims the key (`Cache.claim`): python-redis-lock's Lock, expiring
and renewed while held. Dedup is exactly-once by construction:

- whoever takes the lock reads the entry again before it renders, so a request that missed
  just before the holder stored and got the lock just after it released finds the entry;
- the holder ends with one script (`FINISH`) that stores the result (an error never replaces
  a stored image, and a holder that lost its lock never replaces anything), drops the lock
  and wakes every waiter counted so far with one token each, saying where the answer is:
  `stored` (the entry), `handoff` (a result that is not cached, e.g. an error with
  ERROR_TTL=0 or a 503, kept a few seconds for the waiters of that moment only) or `pass`
  (an output too large to cache: the waiters render in parallel, never one after another);
- a waiter registers (INCR) and then re-reads, in that order, so the finish script either
  counted it or ran before its read and left something to find.

A dead holder's lock expires and the next waiter to look takes it. Any Redis failure
becomes `CacheUnavailable`, which serve() turns into an uncached answer (X-Cache: BYPASS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
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
#: Waiters block on the wake-up list for at most this long between looks at the entry and
#: at their deadline; also bounds how soon a waiter notices a dead holder's expired lock.
WAIT_STEP_S = 1.0
#: How long wake-up tokens, a handed-off result and a pass marker live: long enough for
#: every waiter counted at finish time to read them (they are woken at once).
HANDOFF_MS = 3000

STORED, HANDOFF, PASS = "stored", "handoff", "pass"


#: What a Redis call can raise when Redis is slow or gone. RedisCluster raises
#: RedisClusterException (not a RedisError) when no node answers.
REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)


class CacheUnavailable(Exception):
    """Redis did not answer in time, or not at all."""


class LockWaitTimeout(Exception):
    """A waiter's deadline passed while another request held the render lock."""


@dataclass(frozen=True)
class CacheKey:
    """Where one variant lives. All of a source's keys share one hash tag (`source`), so in
    a Redis Cluster they sit in one slot and one script can touch them together."""

    source: str  # digest of the normalized source URL
    variant: str  # digest of pipeline version, width, quality and format

    def _key(self, kind: str) -> str:
        return f"ip:{{{self.source}}}:{kind}:{self.variant}"

    @property
    def entry(self) -> str:
        return self._key("v")

    @property
    def lock(self) -> str:
        """python-redis-lock's name; it stores the lock itself at "lock:" + this."""
        return self._key("l")

    @property
    def wake(self) -> str:
        return self._key("wake")

    @property
    def waiters(self) -> str:
        return self._key("n")

    @property
    def handoff(self) -> str:
        return self._key("h")

    @property
    def passed(self) -> str:
        return self._key("p")

    # Per-source keys, shared by every variant of one URL (same hash tag, same slot).

    @property
    def record(self) -> str:
        """The source's freshness record: validators, digest, fresh-until."""
        return f"ip:{{{self.source}}}:r"

    @property
    def failing(self) -> str:
        """Set for a few seconds after the upstream failed: stale answers skip the retry."""
        return f"ip:{{{self.source}}}:f"

    @property
    def kept_source(self) -> CacheKey:
        """The kept source body lives as the entry of this pseudo-variant; its claim is the
        one fetch per source in flight fleet-wide."""
        return SourceKey(self.source, "src")


@dataclass(frozen=True)
class SourceKey(CacheKey):
    """The kept source's keys: its entry is `ip:{S}:src`, apart from the rendered variants
    (`ip:{S}:v:*`), which is what monitoring and tests count as cached images."""

    @property
    def entry(self) -> str:
        return f"ip:{{{self.source}}}:src"


@dataclass(frozen=True)
class Look:
    """One round trip's view of a variant: its entry (and raw bytes), the source record,
    and whether the upstream failed a moment ago."""

    entry: CacheEntry | None
    raw: bytes | None
    record: bytes | None
    failing: bool


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
        # The status byte after the magic lets the finish script tell images from errors.
        flag = b"I" if self.ok else b"E"
        return _MAGIC + flag + len(head).to_bytes(4, "big") + head + self.body

    @classmethod
    def from_bytes(cls, raw: bytes) -> CacheEntry | None:
        """The entry, or None for anything unreadable: another version's layout, a field
        this version does not know or lacks, corrupt bytes. None is a miss, never a 500."""
        if raw[:4] != _MAGIC or len(raw) < 9:
            return None
        size = int.from_bytes(raw[5:9], "big")
        try:
            header = json.loads(raw[9 : 9 + size])
            known = {f.name for f in dataclasses.fields(cls)} - {"body"}
            entry = cls(body=raw[9 + size :], **{k: v for k, v in header.items() if k in known})
        except (ValueError, TypeError, AttributeError):
            return None
        if not isinstance(entry.status, int) or not isinstance(entry.content_type, str):
            return None
        return entry


# KEYS: entry, lock ("lock:" + name), wake list, waiter count, handoff, pass marker.
# ARGV: lock id, action (store|handoff|pass|none), value, ttl ms (entry or handoff),
#       is_error, token lifetime ms, token (stored|handoff|pass), sha1 of a stale entry.
# "store" writes the entry unless an image is already there and this result is an error, or
# this caller no longer holds the lock and an entry exists (a newer holder wrote it). The
# one exception: the holder judged exactly that image stale (its sha1 is ARGV[8]) and the
# upstream's answer (404, a changed source that fails to render) must replace it. Then the
# lock is dropped if still ours and every counted waiter gets one token.
_FINISH = b"""
local action = ARGV[2]
local held = redis.call('get', KEYS[2]) == ARGV[1]
if action == 'store' then
    local current = redis.call('get', KEYS[1])
    local keep = false
    if current then
        if ARGV[5] == '1' and string.sub(current, 5, 5) == 'I' and redis.sha1hex(current) ~= ARGV[8] then
            keep = true
        end
        if not held then keep = true end
    end
    if not keep then redis.call('set', KEYS[1], ARGV[3], 'PX', ARGV[4]) end
elseif action == 'handoff' then
    redis.call('set', KEYS[5], ARGV[3], 'PX', ARGV[4])
elseif action == 'pass' then
    redis.call('set', KEYS[6], '1', 'PX', ARGV[6])
end
if held then redis.call('del', KEYS[2]) end
local waiting = tonumber(redis.call('get', KEYS[4]) or '0')
redis.call('del', KEYS[4])
if waiting > 0 then
    for i = 1, math.min(waiting, 10000) do redis.call('rpush', KEYS[3], ARGV[7]) end
    redis.call('pexpire', KEYS[3], ARGV[6])
end
return waiting
"""


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


class RenderLock(redis_lock.Lock):
    """python-redis-lock's Lock whose renewal survives a Redis hiccup.

    The stock renewal thread dies on its first Redis error, so one slow answer could let a
    long render's lock lapse silently. This one retries every second until the lock's
    expiry would pass, and notes when the lock was lost (then `FINISH` stores nothing over a
    newer holder's entry).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost = False

    @staticmethod
    def _lock_renewer(name: str, lockref: Any, interval: float, stop: threading.Event) -> None:
        wait = interval
        while not stop.wait(timeout=wait):
            lock = lockref()
            if lock is None:
                return
            try:
                lock.extend(expire=lock._expire)
                wait = interval
            except redis_lock.NotAcquired:
                lock.lost = True
                log.warning("render lock %s was lost (expired or taken over) while held", name)
                return
            except REDIS_ERRORS as exc:
                # Retry well before the expiry the last renewal set can pass.
                log.info("render lock %s: renewal failed (%s); retrying", name, exc)
                wait = min(1.0, interval / 4)
            del lock

    def stop_renewal(self) -> None:
        self._stop_lock_renewer()


@dataclass
class Claim:
    """What `Cache.claim` found: an entry to answer with, or the duty to render.

    `entry` is set when another request's result is there (stored or handed off). `holder`
    is True when this request holds the lock and must render and then `finish`. Neither:
    the holder's result could not be shared (too large to cache), so render in parallel.
    """

    entry: CacheEntry | None = None
    holder: bool = False
    handed_off: bool = False
    lock: RenderLock | None = None
    #: Set by a holder whose result must reach the waiters of this moment but not be
    #: stored (a stale entry served while the upstream fails): finish hands it off.
    share: bool = False


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
        self._finish = wait_client.register_script(_FINISH)
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
        except REDIS_ERRORS as exc:
            raise self._failed("ping", exc) from None
        self._answered()

    # -- entries -------------------------------------------------------------------------

    def get(self, key: CacheKey) -> CacheEntry | None:
        try:
            raw = self.client.get(key.entry)
        except REDIS_ERRORS as exc:
            raise self._failed("get", exc) from None
        self._answered()
        return CacheEntry.from_bytes(raw) if raw else None

    def look(self, key: CacheKey) -> Look:
        """The hit path's one round trip: entry, source record and failure marker in one MGET
        (one hash tag, so one slot in a Cluster too)."""
        try:
            raw, record, failing = self.client.mget([key.entry, key.record, key.failing])
        except REDIS_ERRORS as exc:
            raise self._failed("get", exc) from None
        self._answered()
        return Look(CacheEntry.from_bytes(raw) if raw else None, raw, record, bool(failing))

    def put_record(self, key: CacheKey, record: bytes, ttl: int) -> None:
        """Write the source's freshness record and clear its failure marker."""
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(key.record, record, ex=max(1, ttl))
            pipe.delete(key.failing)
            pipe.execute()
        except REDIS_ERRORS as exc:
            raise self._failed("set record", exc) from None

    def get_record(self, key: CacheKey) -> bytes | None:
        try:
            return self.client.get(key.record)
        except REDIS_ERRORS as exc:
            raise self._failed("get record", exc) from None

    def mark_failing(self, key: CacheKey, seconds: float) -> None:
        try:
            self.client.set(key.failing, b"1", px=max(1, int(seconds * 1000)))
        except REDIS_ERRORS as exc:
            self._failed("set failure marker", exc)

    def purge(self, source: str) -> int:
        """Delete every variant, the kept source and the record of one source; returns how
        many entries (variants and kept source) went. Finds them by SCAN on the node that
        owns the source's slot, so it works on one Redis and on a Cluster; claim keys
        (locks, wake-up lists) are left to the renders in flight."""
        probe = CacheKey(source, "x")
        try:
            if self.cluster:
                node = self.client.get_node_from_key(probe.record)
                conn = self.client.get_redis_connection(node)
            else:
                conn = self.client
            found = [k.decode() if isinstance(k, bytes) else k
                     for k in conn.scan_iter(match=f"ip:{{{source}}}:*", count=1000)]
            entries = [k for k in found if k.startswith(f"ip:{{{source}}}:v:") or k == SourceKey(source, "").entry]
            others = [k for k in (probe.record, probe.failing) if k in found]
            if not entries and not others:
                return 0
            pipe = conn.pipeline(transaction=False)
            for name in entries:
                pipe.delete(name)
            for name in others:
                pipe.delete(name)
            deleted = pipe.execute()
        except REDIS_ERRORS as exc:
            raise self._failed("purge", exc) from None
        return sum(int(n) for n in deleted[: len(entries)])

    def storable(self, entry: CacheEntry) -> bool:
        ttl = self.ttl if entry.ok else self.error_ttl
        return ttl > 0 and len(entry.body) <= self.max_entry_bytes

    # -- the per-key render claim --------------------------------------------------------

    @contextmanager
    def claim(self, key: CacheKey, deadline: float, *, stale: CacheEntry | None = None) -> Iterator[Claim]:
        """Claim the key's render, or wait for whoever has it.

        `stale` is an entry the caller found and judged out of date: it counts as missing,
        so the caller (or the holder it waits for) replaces it rather than answering with it.

        Yields a `Claim` (see there). A holder must call `finish(key, claim, entry)` before
        leaving; if it leaves by an exception, the lock is dropped and the waiters are told
        to try for themselves. Raises `LockWaitTimeout` when `deadline` (time.monotonic)
        passes while waiting, and CacheUnavailable when Redis fails.
        """
        lock = RenderLock(self.wait_client, key.lock, expire=self.lock_expire, auto_renewal=True,
                          strict=not self.cluster)
        try:
            found = self._claim(lock, key, deadline, stale)
        except REDIS_ERRORS as exc:
            raise self._failed("lock", exc) from None
        try:
            yield found
        except BaseException:
            if found.holder and found.lock is not None:
                self._finish_quietly(key, found, "pass", PASS, b"", 0, is_error=True)
            raise

    def _claim(self, lock: RenderLock, key: CacheKey, deadline: float, stale: CacheEntry | None) -> Claim:
        if lock.acquire(blocking=False):
            return self._as_holder(lock, key, stale)
        # Register first, then look: FINISH either counted this waiter or ran before the
        # look and left the entry, a handoff or a pass marker for it to find.
        pipe = self.wait_client.pipeline(transaction=False)
        pipe.incr(key.waiters)
        pipe.pexpire(key.waiters, int(self.lock_expire * 1000))
        pipe.get(key.entry)
        pipe.get(key.handoff)
        pipe.get(key.passed)
        _, _, raw_entry, raw_handoff, passed = pipe.execute()
        found = self._from_look(raw_entry, raw_handoff, passed, stale)
        while found is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockWaitTimeout("waited too long for another request's render")
            woken = self.wait_client.blpop([key.wake], timeout=max(0.01, min(WAIT_STEP_S, remaining)))
            token = woken[1].decode() if woken else ""
            if token == PASS:
                return Claim()
            if token == HANDOFF:
                found = self._from_look(None, self.wait_client.get(key.handoff), None, stale)
            else:
                found = self._from_look(self.wait_client.get(key.entry), None, None, stale)
            if found is None and not woken and lock.acquire(blocking=False):
                # The holder died (its lock expired) or left without a result.
                return self._as_holder(lock, key, stale)
        return found

    @staticmethod
    def _from_look(raw_entry: bytes | None, raw_handoff: bytes | None, passed: bytes | None,
                   stale: CacheEntry | None = None) -> Claim | None:
        entry = CacheEntry.from_bytes(raw_entry) if raw_entry else None
        if entry is not None and entry != stale:
            return Claim(entry=entry)
        handed = CacheEntry.from_bytes(raw_handoff) if raw_handoff else None
        if handed is not None:
            return Claim(entry=handed, handed_off=True)
        if passed:
            return Claim()
        return None

    def _as_holder(self, lock: RenderLock, key: CacheKey, stale: CacheEntry | None = None) -> Claim:
        # Re-read after every successful acquire: the previous holder may have stored the
        # entry between this request's miss and its acquire.
        try:
            raw = self.wait_client.get(key.entry)
            entry = CacheEntry.from_bytes(raw) if raw else None
            if entry is not None and entry != stale:
                self._finish_script(key, lock, "none", STORED, b"", 0, is_error=True)
                return Claim(entry=entry)
            # A new moment: the previous holder's handoff and pass marker are not its
            # waiters' answer (they are kept 3 s only for the waiters of that moment).
            self.wait_client.delete(key.handoff, key.passed)
        except BaseException:
            with contextlib.suppress(*REDIS_ERRORS, redis_lock.NotAcquired):
                lock.release()  # never leave a lock (and its renewer) behind
            raise
        return Claim(holder=True, lock=lock)

    def finish(self, key: CacheKey, claim: Claim, entry: CacheEntry, *, cacheable: bool = True,
               replaces: bytes | None = None, ttl: int | None = None) -> str:
        """End a holder's claim with its result: stored; handed off to the waiters of this
        moment (a failure that is not cached, or `share`d); or, for an output too large to
        pass around, the waiters render in parallel. Returns what happened (STORED, HANDOFF
        or PASS). `replaces`: the raw stale entry this result may replace even if it is an
        error. `ttl` overrides the entry's lifetime (seconds)."""
        if cacheable and self.storable(entry):
            ttl_s = ttl if ttl is not None and entry.ok else (self.ttl if entry.ok else self.error_ttl)
            action, token, ttl_ms = "store", STORED, max(1, ttl_s) * 1000
        elif not entry.ok or claim.share:
            action, token, ttl_ms = "handoff", HANDOFF, HANDOFF_MS
        else:
            action, token, ttl_ms = "pass", PASS, 0
        value = entry.to_bytes() if action != "pass" else b""
        stale_sha = hashlib.sha1(replaces).hexdigest() if replaces else ""
        if not self._finish_quietly(key, claim, action, token, value, ttl_ms, is_error=not entry.ok,
                                    stale_sha=stale_sha):
            return PASS
        return token

    def _finish_quietly(self, key: CacheKey, claim: Claim, action: str, token: str, value: bytes, ttl_ms: int,
                        *, is_error: bool, stale_sha: str = "") -> bool:
        lock, claim.lock = claim.lock, None
        if lock is None:
            return False
        try:
            self._finish_script(key, lock, action, token, value, ttl_ms, is_error=is_error, stale_sha=stale_sha)
        except REDIS_ERRORS as exc:
            self._failed("finish", exc)
            return False
        self._answered()
        return True

    def _finish_script(self, key: CacheKey, lock: RenderLock, action: str, token: str, value: bytes, ttl_ms: int,
                       *, is_error: bool, stale_sha: str = "") -> None:
        lock.stop_renewal()
        self._finish(
            keys=[key.entry, "lock:" + key.lock, key.wake, key.waiters, key.handoff, key.passed],
            args=[lock.id, action, value, max(1, ttl_ms), "1" if is_error else "0", HANDOFF_MS, token, stale_sha],
            client=self.wait_client,
        )
