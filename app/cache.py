"""Rendered images, failures and kept sources in Redis, and the per-key claim: the only Redis code.

A hit is one MGET (`Cache.look`). A miss claims the key (`Cache.claim`): python-redis-lock's
Lock with a short expiry (LOCK_EXPIRE, at most 10 s by default), renewed while its holder
lives, so a holder that dies frees the key within that expiry and a waiter takes over inside
its own request budget. Dedup is exactly-once by construction:

- whoever takes the lock reads the entry again before it renders, so a request that missed
  just before the holder stored and got the lock just after it released finds the entry;
- the holder ends with one script (`_FINISH`) that carries out its `Outcome` (store it, hand
  it to the waiters of this moment, let them render in parallel, or just let go), drops the
  lock and pushes ONE wake-up signal; a waiter woken by it reads the answer and passes the
  signal on (chain wake-up), so no count of waiters is kept and nothing is left behind but a
  signal that expires in HANDOFF_MS (and that the next holder deletes);
- a waiter reads first and blocks on the signal after, so either its read sees the answer
  or the signal arrives after it started waiting; between signals it looks again every
  WAIT_STEP_S and tries the lock (a dead holder's lock has then expired).

Redis health (`RedisHealth`): after a Redis timeout or connection failure, this process
treats Redis as down for DOWN_S and every cache call fails at once (`CacheUnavailable`,
X-Cache: BYPASS); then one call at a time probes it with the normal timeout until it answers.
So a stalled Redis costs one request per DOWN_S one timeout, not every request two.

Kept sources are bounded: finishing a kept source's claim with STORE counts its body in an
index of kept bodies and their sizes, and the oldest are dropped past SOURCE_CACHE_BYTES,
so downloads can never push the rendered images out of Redis.
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

from app.errors import ProxyError, UpstreamFailed

log = logging.getLogger("image_proxy.cache")

_MAGIC = b"IPC1"
#: Waiters block on the wake-up signal for at most this long between looks at the entry and
#: at the lock: also bounds how soon a waiter notices a dead holder's expired lock.
WAIT_STEP_S = 1.0
#: How long a handed-off result, a pass marker and the wake-up signal live: long enough for
#: every waiter of that moment to read them (they are woken one after another, in
#: microseconds).
HANDOFF_MS = 3000
#: After a Redis timeout, how long this process skips Redis before it probes again.
DOWN_S = 0.5

#: What a Redis call can raise when Redis is slow or gone. RedisCluster raises
#: RedisClusterException (not a RedisError) when no node answers.
REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)
#: The ones that say "Redis is not answering" (not "Redis answered with an error").
_DOWN_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.RedisClusterException, OSError)


class CacheUnavailable(Exception):
    """Redis did not answer in time, or not at all, or is being skipped after it did not."""


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


#: The index of kept sources (sorted set: entry key -> expiry ms) and their sizes (hash, plus
#: a `_total` field); one hash tag of their own, so one slot in a Cluster.
KEPT_INDEX, KEPT_SIZES = "ip:{kept}:index", "ip:{kept}:sizes"


@dataclass(frozen=True)
class SourceRecord:
    """What is stored about a source, shared by all its variants: the digest of its bytes,
    the end of its freshness and the upstream's validators (rules: app/image/freshness.py)."""

    digest: str
    fresh_until: float  # epoch seconds
    etag: str = ""
    last_modified: str = ""

    def is_fresh(self, now: float) -> bool:
        return now < self.fresh_until

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> SourceRecord | None:
        """None for a missing or unreadable record (another version's layout): then the
        variants' own stamps decide, and the next fetch writes a new one."""
        if not raw:
            return None
        try:
            data = json.loads(raw)
            return cls(str(data["digest"]), float(data["fresh_until"]), str(data.get("etag", "")),
                       str(data.get("last_modified", "")))
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True)
class Look:
    """One round trip's view of a variant: its entry (and raw bytes), the source record,
    and whether the upstream failed a moment ago."""

    entry: CacheEntry | None
    raw: bytes | None
    record: SourceRecord | None
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

    # -- the one codec between failures and entries --------------------------------------

    @classmethod
    def from_error(cls, exc: ProxyError) -> CacheEntry:
        return cls(status=exc.status, body=b"", content_type="application/json", error=exc.message,
                   kind=exc.kind, retry_after=exc.retry_after)

    def as_error(self) -> ProxyError:
        """The failure this entry holds, as the same ProxyError class (so its status, kind and
        cacheability are the ones the request that met it had)."""
        cls = next((c for c in _subclasses(ProxyError) if c.kind == self.kind), UpstreamFailed)
        exc = cls.__new__(cls)
        ProxyError.__init__(exc, self.error or "upstream failed", retry_after=self.retry_after)
        return exc

    # -- bytes -----------------------------------------------------------------------------

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


def _subclasses(cls: type[ProxyError]) -> list[type[ProxyError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_subclasses(sub))
    return found


# -- outcomes ------------------------------------------------------------------------------

STORE, SHARE, PASS, RELEASE = "store", "share", "pass", "release"


@dataclass(frozen=True)
class Outcome:
    """How a holder's claim ends (decided in one place, app/image/miss.py `decide`):

    STORE    the entry is stored for `ttl_ms` and every waiter reads it;
    SHARE    the entry is handed to the waiters of this moment only, never stored;
    PASS     the waiters render in parallel, each for itself (an output too large to pass on);
    RELEASE  the holder lets go with nothing to give (its own budget or memory ran out, or it
             found the entry already there): the next waiter takes the lock and tries.
    """

    action: str
    entry: CacheEntry | None = None
    ttl_ms: int = 0
    #: The raw stale entry this result may replace even if the result is an error.
    replaces: bytes | None = None


# KEYS: entry, lock ("lock:" + name), wake list, handoff, pass marker.
# ARGV: lock id, action, value, ttl ms, is_error, handoff ms, sha1 of a stale entry.
# "store" writes the entry unless an image is already there and this result is an error, or
# this caller no longer holds the lock and an entry exists (a newer holder wrote it). The
# one exception to both: the entry there is exactly the one the holder judged stale (its
# sha1 is ARGV[7]): the upstream's answer (a new render, a 404, a changed source that fails
# to render) must replace it. Then the
# lock is dropped if still ours and one wake-up signal is pushed.
_FINISH = b"""
local action = ARGV[2]
local held = redis.call('get', KEYS[2]) == ARGV[1]
if action == 'store' then
    local current = redis.call('get', KEYS[1])
    local keep = false
    if current then
        if ARGV[5] == '1' and string.sub(current, 5, 5) == 'I' and redis.sha1hex(current) ~= ARGV[7] then
            keep = true
        end
        if not held and redis.sha1hex(current) ~= ARGV[7] then keep = true end
    end
    if not keep then redis.call('set', KEYS[1], ARGV[3], 'PX', ARGV[4]) end
elseif action == 'share' then
    redis.call('set', KEYS[4], ARGV[3], 'PX', ARGV[6])
elseif action == 'pass' then
    redis.call('set', KEYS[5], '1', 'PX', ARGV[6])
end
if held then redis.call('del', KEYS[2]) end
redis.call('del', KEYS[3])
redis.call('rpush', KEYS[3], '1')
redis.call('pexpire', KEYS[3], ARGV[6])
return held and 1 or 0
"""

# KEYS: kept index, kept sizes. ARGV: now ms, entry key, size, expiry ms, cap bytes, index ttl ms.
# Drops expired members, adds this one, then drops the oldest others until the total fits the
# cap (never the one just added: the caller keeps only bodies within the cap);
# returns the dropped entry keys still to delete (the caller deletes them: in a Cluster they
# live in other slots).
_BOUND_KEPT = b"""
local total = tonumber(redis.call('hget', KEYS[2], '_total') or '0')
local dropped = {}
local function drop(member, report)
    total = total - tonumber(redis.call('hget', KEYS[2], member) or '0')
    redis.call('hdel', KEYS[2], member)
    redis.call('zrem', KEYS[1], member)
    if report then table.insert(dropped, member) end
end
for _, member in ipairs(redis.call('zrangebyscore', KEYS[1], '-inf', ARGV[1])) do drop(member, false) end
if redis.call('hexists', KEYS[2], ARGV[2]) == 1 then drop(ARGV[2], false) end
redis.call('zadd', KEYS[1], ARGV[4], ARGV[2])
redis.call('hset', KEYS[2], ARGV[2], ARGV[3])
total = total + tonumber(ARGV[3])
while total > tonumber(ARGV[5]) do
    local oldest = redis.call('zrange', KEYS[1], 0, 1)
    local victim = oldest[1]
    if victim == ARGV[2] then victim = oldest[2] end
    if not victim then break end
    drop(victim, true)
end
if total < 0 then total = 0 end
redis.call('hset', KEYS[2], '_total', total)
redis.call('pexpire', KEYS[1], ARGV[6])
redis.call('pexpire', KEYS[2], ARGV[6])
return dropped
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
    long render's lock lapse silently. This one renews every third of the expiry and retries
    every quarter interval (at most 1 s) until the lock's expiry would pass. A lock that
    lapsed anyway is harmless: `_FINISH` then stores nothing over a newer holder's entry.
    """

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
                log.warning("render lock %s was lost (expired or taken over) while held", name)
                return
            except REDIS_ERRORS as exc:
                log.info("render lock %s: renewal failed (%s); retrying", name, exc)
                wait = min(1.0, interval / 4)
            del lock

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._lock_renewal_interval is not None:
            # Every third of the expiry (the stock 2/3 leaves room for one failed renewal):
            # a Redis stall shorter than about 2/3 of LOCK_EXPIRE never costs the lock.
            self._lock_renewal_interval = float(self._expire) / 3

    def stop_renewal(self) -> None:
        self._stop_lock_renewer()


class RedisHealth:
    """Whether this process should talk to Redis now. Closed (talk) until a call times out or
    cannot connect; then open for DOWN_S (every call skips Redis at once); then one call
    probes while the others still skip; its success closes it, its failure opens it again."""

    def __init__(self, down_s: float = DOWN_S) -> None:
        self.down_s = down_s
        self._down_until = 0.0
        self._probing = False
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self._down_until > 0

    def admit(self) -> bool:
        if not self._down_until:  # the common case, without the lock
            return True
        with self._lock:
            if not self._down_until:
                return True
            if self._probing or time.monotonic() < self._down_until:
                return False
            self._probing = True
            return True

    def failed(self, what: str, exc: Exception) -> None:
        with self._lock:
            was_up = not self._down_until
            self._down_until = time.monotonic() + self.down_s
            self._probing = False
        if was_up:
            log.warning("redis unavailable during %s (%s); serving uncached, probing every %.1f s",
                        what, exc, self.down_s)

    def answered(self) -> None:
        if not self._down_until:
            return
        with self._lock:
            was_down, self._down_until, self._probing = bool(self._down_until), 0.0, False
        if was_down:
            log.warning("redis answers again; caching resumed")


@dataclass
class Claim:
    """What `Cache.claim` found: an answer, or the duty to render.

    `entry` is set when another request's result is there (stored or handed to this moment's
    waiters: `handed_off`). `holder` is True when this request holds the lock and must render
    and then `finish`. Neither: the holder's output could not be passed on, render in parallel.
    """

    entry: CacheEntry | None = None
    holder: bool = False
    handed_off: bool = False
    lock: RenderLock | None = None


class Cache:
    def __init__(self, client: Any, wait_client: Any, *, lock_expire: int, kept_cap: int = 64 << 20,
                 cluster: bool = False, health: RedisHealth | None = None) -> None:
        self.client = client
        # Waiters block on the wake-up signal for WAIT_STEP_S; they need a socket timeout
        # above that, while every other command keeps the short one.
        self.wait_client = wait_client
        self.lock_expire = lock_expire
        self.kept_cap = kept_cap  # SOURCE_CACHE_BYTES
        self.cluster = cluster
        self.health = health or RedisHealth()
        self._finish = client.register_script(_FINISH)
        self._bound_kept = client.register_script(_BOUND_KEPT)

    @contextmanager
    def _redis(self, what: str, *, probe: bool = False) -> Iterator[None]:
        """Every Redis call runs inside this: skipped at once while Redis is down (unless it
        is a `probe`), and its failure (any Redis error) is a CacheUnavailable."""
        if not probe and not self.health.admit():
            raise CacheUnavailable(f"{what}: redis is down (skipped)")
        try:
            yield
        except _DOWN_ERRORS as exc:
            self.health.failed(what, exc)
            raise CacheUnavailable(f"{what}: {exc}") from None
        except REDIS_ERRORS as exc:
            self.health.answered()  # it answered, with an error (CLUSTERDOWN, OOM, ...)
            log.warning("redis answered %s with an error (%s); this request is served uncached", what, exc)
            raise CacheUnavailable(f"{what}: {exc}") from None
        except BaseException:
            self.health.answered()  # e.g. a waiter's deadline: Redis was answering throughout
            raise
        self.health.answered()

    def ping(self) -> None:
        """/healthz asks Redis itself, down or not: its answer is the operator's, and a
        success ends the skipping at once."""
        with self._redis("ping", probe=True):
            self.client.ping()

    # -- entries -------------------------------------------------------------------------

    def get(self, key: CacheKey) -> CacheEntry | None:
        with self._redis("get"):
            raw = self.client.get(key.entry)
        return CacheEntry.from_bytes(raw) if raw else None

    def look(self, key: CacheKey) -> Look:
        """The one round trip of a request: entry, source record and failure marker in one
        MGET (one hash tag, so one slot in a Cluster too)."""
        with self._redis("get"):
            raw, record, failing = self.client.mget([key.entry, key.record, key.failing])
        return Look(CacheEntry.from_bytes(raw) if raw else None, raw, SourceRecord.from_bytes(record), bool(failing))

    def put_record(self, key: CacheKey, record: SourceRecord, ttl: int) -> None:
        """Write the source's freshness record and clear its failure marker."""
        with self._redis("set record"):
            pipe = self.client.pipeline(transaction=False)
            pipe.set(key.record, record.to_bytes(), ex=max(1, ttl))
            pipe.delete(key.failing)
            pipe.execute()

    def get_record(self, key: CacheKey) -> SourceRecord | None:
        with self._redis("get record"):
            return SourceRecord.from_bytes(self.client.get(key.record))

    def mark_failing(self, key: CacheKey, seconds: float) -> None:
        with contextlib.suppress(CacheUnavailable), self._redis("set failure marker"):
            self.client.set(key.failing, b"1", px=max(1, int(seconds * 1000)))

    def _bound_kept_sources(self, skey: CacheKey, size: int, ttl_ms: int) -> None:
        """Count a kept source against SOURCE_CACHE_BYTES and drop the oldest kept sources
        past it (they are deleted one by one: in a Cluster they live in other slots)."""
        now_ms = int(time.time() * 1000)
        dropped = self._bound_kept(keys=[KEPT_INDEX, KEPT_SIZES],
                                   args=[now_ms, skey.entry, size, now_ms + ttl_ms, self.kept_cap, 2 * ttl_ms])
        for name in dropped:
            self.client.delete(name)

    def purge(self, source: str) -> int:
        """Delete every variant, the kept source and the record of one source; returns how
        many entries (variants and kept source) went. Finds them by SCAN on the node that
        owns the source's slot, so it works on one Redis and on a Cluster; claim keys
        (locks, wake-up signals) are left to the renders in flight."""
        probe = CacheKey(source, "x")
        with self._redis("purge"):
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
            for name in entries + others:
                pipe.delete(name)
            deleted = pipe.execute()
        return sum(int(n) for n in deleted[: len(entries)])

    # -- the per-key claim ---------------------------------------------------------------

    @contextmanager
    def claim(self, key: CacheKey, deadline: float, *, stale: bytes | None = None) -> Iterator[Claim]:
        """Claim the key's render, or wait for whoever has it.

        `stale` is the raw entry the caller found and judged out of date: it counts as
        missing, so the caller (or the holder it waits for) replaces it.

        Yields a `Claim` (see there). A holder must call `finish(key, claim, outcome)` before
        leaving; if it leaves by an exception, it RELEASEs (the next waiter takes over).
        Raises `LockWaitTimeout` when `deadline` (time.monotonic) passes while waiting, and
        CacheUnavailable when Redis fails.
        """
        # The lock's commands (and its renewal) use the short-timeout client: only the
        # waiters' blocking pop needs the long one.
        lock = RenderLock(self.client, key.lock, expire=self.lock_expire, auto_renewal=True,
                          strict=not self.cluster)
        with self._redis("lock"):
            found = self._claim(lock, key, deadline, stale)
        try:
            yield found
        finally:
            if found.lock is not None:  # left without finishing (an exception, a bug): let go
                self.finish(key, found, Outcome(RELEASE))

    def _claim(self, lock: RenderLock, key: CacheKey, deadline: float, stale: bytes | None) -> Claim:
        if lock.acquire(blocking=False):
            return self._as_holder(lock, key, stale)
        # Redis answered: if this claim was the probe, the others need not wait for its wait.
        self.health.answered()
        woken = False
        while True:
            # The answer first, the lock after: a woken waiter of this moment reads what its
            # holder left (a handoff is for it), and takes the lock only when nothing is there.
            found = self._answer(key, stale)
            if found is not None:
                if woken:  # pass the one signal on to the next waiter
                    pipe = self.client.pipeline(transaction=False)
                    pipe.rpush(key.wake, "1")
                    pipe.pexpire(key.wake, HANDOFF_MS)
                    pipe.execute()
                return found
            if lock.acquire(blocking=False):
                # The holder let go with nothing to give (RELEASE) or died (its lock expired).
                return self._as_holder(lock, key, stale)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockWaitTimeout("waited too long for another request's render")
            woken = bool(self.wait_client.blpop([key.wake], timeout=max(0.01, min(WAIT_STEP_S, remaining))))

    def _answer(self, key: CacheKey, stale: bytes | None) -> Claim | None:
        raw_entry, raw_handoff, passed = self.client.mget([key.entry, key.handoff, key.passed])
        entry = CacheEntry.from_bytes(raw_entry) if raw_entry and raw_entry != stale else None
        if entry is not None:
            return Claim(entry=entry)
        handed = CacheEntry.from_bytes(raw_handoff) if raw_handoff else None
        if handed is not None:
            return Claim(entry=handed, handed_off=True)
        if passed:
            return Claim()
        return None

    def _as_holder(self, lock: RenderLock, key: CacheKey, stale: bytes | None) -> Claim:
        # Re-read after every acquire: the previous holder may have stored the entry between
        # this request's miss and its acquire.
        try:
            raw = self.client.get(key.entry)
            entry = CacheEntry.from_bytes(raw) if raw and raw != stale else None
            if entry is not None:
                self._run_finish(key, lock, Outcome(RELEASE))
                return Claim(entry=entry)
            # A new moment: the previous holder's handoff, pass marker and signal are not for
            # this moment's waiters.
            self.client.delete(key.handoff, key.passed, key.wake)
        except BaseException:
            with contextlib.suppress(*REDIS_ERRORS, redis_lock.NotAcquired):
                lock.release()  # never leave a lock (and its renewer) behind
            raise
        return Claim(holder=True, lock=lock)

    def finish(self, key: CacheKey, claim: Claim, outcome: Outcome) -> bool:
        """End a holder's claim with its `Outcome`. False when Redis failed (the lock then
        expires by itself and a waiter takes over) or the claim was already finished."""
        lock, claim.lock = claim.lock, None
        if lock is None:
            return False
        lock.stop_renewal()  # whatever happens next, this holder is done with the key
        try:
            # Always tried, even while Redis is being skipped: a result thrown away, or a lock
            # left to expire, would cost every waiter its wait and a second render.
            with self._redis("finish", probe=True):
                self._run_finish(key, lock, outcome)
                if isinstance(key, SourceKey) and outcome.action == STORE and outcome.entry is not None:
                    self._bound_kept_sources(key, len(outcome.entry.body), outcome.ttl_ms)
        except CacheUnavailable:
            return False
        return True

    def _run_finish(self, key: CacheKey, lock: RenderLock, outcome: Outcome) -> None:
        lock.stop_renewal()
        entry = outcome.entry
        value = entry.to_bytes() if entry is not None and outcome.action in (STORE, SHARE) else b""
        stale_sha = hashlib.sha1(outcome.replaces).hexdigest() if outcome.replaces else ""
        self._finish(
            keys=[key.entry, "lock:" + key.lock, key.wake, key.handoff, key.passed],
            args=[lock.id, outcome.action, value, max(1, outcome.ttl_ms), "0" if entry is None or entry.ok else "1",
                  HANDOFF_MS, stale_sha],
            client=self.client,
        )
