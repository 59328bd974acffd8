"""`make chaos`: overload, restart and fault scenarios at realistic sizes, one table out.

Every scenario starts its own gunicorn (the project's gunicorn.conf.py, default settings
unless the row says otherwise), its own loopback upstream and, where it needs one, its own
redis-server, and stops each by PID. Every load loop is bounded in count and time. The
whole run took 17 minutes on 2 shared cores (2026-12-06), dedup's 4 x 200 rounds 10 of
them; `--dedup-rounds` shortens it. Only 127.0.0.1 is ever contacted.

Issue #20's rows: gallery, holder, stall, admission, kept (bench/miss_model.py), hostile, dedup.

    python -m bench.chaos [--only NAME,...] [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import requests

from app.embedded_redis import EmbeddedRedis, start_embedded_redis
from bench.hostile import hostile
from bench.miss_model import admission, gallery, kept_sources
from tests.conftest import Gunicorn, free_port, gunicorn_env
from tests.upstream import Upstream

PHOTOS = [
    "panda_3872x2592.jpg",
    "lunch_3264x1836.jpg",
    "saw_2725x2225.jpg",
    "waterfall_1800x1200.jpg",
    "insect_2560x1280.jpg",
    "portrait_1200x1800.jpg",
]


@dataclass
class Row:
    scenario: str
    load: str
    requests: int = 0
    failures: int = 0
    latencies: list[float] = field(default_factory=list)
    recovery: str = "-"
    notes: str = ""

    def cells(self) -> list[str]:
        lat = sorted(self.latencies)
        p50 = f"{statistics.median(lat) * 1000:.0f}" if lat else "-"
        p95 = f"{lat[min(len(lat) - 1, int(len(lat) * 0.95))] * 1000:.0f}" if lat else "-"
        return [self.scenario, self.load, str(self.requests), str(self.failures), p50, p95, self.recovery, self.notes]


class Env:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.upstream = Upstream().start()
        self.started: list[Gunicorn] = []

    def gunicorn(self, **settings: str) -> Gunicorn:
        port = free_port()
        settings.setdefault("bind", f"127.0.0.1:{port}")
        settings.setdefault("allow_networks", "127.0.0.0/8")
        server = Gunicorn(gunicorn_env(**settings), port, self.workdir / f"gunicorn-{port}.log")
        self.started.append(server)
        return server.start()

    def url(self, server: Gunicorn, path: str, **params: object) -> str:
        extra = "".join(f"&{k}={v}" for k, v in params.items())
        return f"{server.base}/image?url={quote(self.upstream.url(path), safe='')}{extra}"

    def close(self) -> None:
        for server in self.started:
            server.stop()
        self.upstream.stop()


def timed_get(url: str, session: requests.Session | None = None, **kwargs: object) -> tuple[int, float, str]:
    started = time.monotonic()
    try:
        response = (session or requests).get(url, timeout=60, **kwargs)  # type: ignore[arg-type]
        return response.status_code, time.monotonic() - started, response.headers.get("X-Cache", "")
    except requests.RequestException as exc:
        return -1, time.monotonic() - started, type(exc).__name__


Result = tuple[int, float, str]  # status (-1: connection error), seconds, X-Cache


def hit_loop(url: str, until: Callable[[], bool], limit: int = 2000, pause: float = 0.02) -> list[Result]:
    results = []
    with requests.Session() as session:
        while not until() and len(results) < limit:
            results.append(timed_get(url, session))
            time.sleep(pause)
    return results


# -- scenarios ---------------------------------------------------------------------------


@contextlib.contextmanager
def hits_meanwhile(env: Env, server: Gunicorn) -> Iterator[list[Result]]:
    """One client asking for a cached image in a loop while the block runs; the yielded list
    holds its results once the block is done."""
    hit_url = env.url(server, "photos/waterfall_1800x1200.jpg", w=320)
    timed_get(hit_url)
    done = threading.Event()
    hits: list[Result] = []
    with ThreadPoolExecutor(1) as hitter:
        future = hitter.submit(hit_loop, hit_url, done.is_set)
        try:
            yield hits
        finally:
            done.set()
            hits.extend(future.result())


def flood(env: Env) -> list[Row]:
    """A cold page: 64 distinct misses at once, while a client keeps asking for a cached image."""
    server = env.gunicorn()
    with hits_meanwhile(env, server) as hits, ThreadPoolExecutor(64) as pool:
        misses = list(pool.map(
            lambda i: timed_get(env.url(server, f"v/flood{i}/photos/{PHOTOS[i % len(PHOTOS)]}", w=640)),
            range(64),
        ))
    ok = sum(1 for s, _, _ in misses if s == 200)
    busy = sum(1 for s, _, _ in misses if s == 503)
    # A page's <img> that got a 503 stays broken (browsers do not retry it): every one of
    # the 64 must be served, so a 503 counts as a failure here.
    return [
        Row("flood: misses", "64 concurrent distinct misses, w=640 webp", len(misses),
            sum(1 for s, _, _ in misses if s != 200), [t for _, t, _ in misses],
            notes=f"{ok} rendered, {busy} got 503"),
        Row("flood: hits meanwhile", "1 client, hits in a loop", len(hits), sum(1 for s, _, _ in hits if s != 200),
            [t for _, t, _ in hits]),
    ]


def burst(env: Env) -> list[Row]:
    """A new hot image: 120 identical requests at once, while a client keeps asking for a
    cached image. Waiters hold no miss place, so none is shed and one render serves all."""
    from tests.dedup_rounds import one_round

    server = env.gunicorn()
    with hits_meanwhile(env, server) as hits:
        started = time.monotonic()
        fetches, statuses, bodies, cache = one_round([server.base], env.upstream, "photos/panda_3872x2592.jpg", 120)
        elapsed = time.monotonic() - started
    return [
        Row("burst: identical", "120 identical requests for one new image, w=64", len(statuses),
            sum(1 for s in statuses if s != 200), [elapsed], notes=f"upstream fetches: {fetches}; "
            f"distinct bodies: {bodies}; MISS {cache.count('MISS')}, HIT {cache.count('HIT')}; p50/p95 = all done"),
        Row("burst: hits meanwhile", "1 client, hits in a loop", len(hits), sum(1 for s, _, _ in hits if s != 200),
            [t for _, t, _ in hits]),
    ]


DEDUP_ROUNDS = 200


def dedup(env: Env, redis_server: EmbeddedRedis, rounds: int = DEDUP_ROUNDS) -> list[Row]:
    """`rounds` rounds of 48 concurrent identical requests for a fresh URL, per case
    (one instance / two sharing one Redis, fast / slow upstream): exactly 1 fetch each."""
    from tests.dedup_rounds import run_rounds

    rows = []
    servers = [env.gunicorn(redis_url=redis_server.url) for _ in range(2)]
    for instances in (1, 2):
        for speed, source in (("fast", "photos/portrait_1200x1800.jpg"),
                              ("slow", "slow-image/0.3/photos/portrait_1200x1800.jpg")):
            started = time.monotonic()
            result = run_rounds([s.base for s in servers[:instances]], env.upstream, source, rounds=rounds)
            per_round = ", ".join(f"{n} fetch: {count}" for n, count in sorted(result.fetches.items()))
            rows.append(Row(f"dedup: {instances} instance(s), {speed} upstream",
                            f"{result.rounds} rounds x 48 identical new URLs", result.rounds * 48,
                            len(result.bad_rounds), [(time.monotonic() - started) / max(1, result.rounds)],
                            notes=f"rounds by upstream fetches: {per_round}; statuses {dict(result.statuses)}"))
    return rows


def hup(env: Env) -> list[Row]:
    """Deploy under load: kill -HUP the master while 8 clients send hits and misses."""
    server = env.gunicorn()
    cached = env.url(server, "photos/saw_2725x2225.jpg", w=200)
    timed_get(cached)
    stop_at = time.monotonic() + 10
    results: list[tuple[int, float, str]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        n = 0
        while time.monotonic() < stop_at and n < 500:
            n += 1
            url = cached if n % 2 else env.url(server, f"v/hup{index}-{n}/photos/portrait_1200x1800.jpg", w=160)
            result = timed_get(url, headers={"Connection": "close"})
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    assert server.process is not None
    old = set(server.workers())
    os.kill(server.process.pid, signal.SIGHUP)
    for thread in threads:
        thread.join()
    replaced = not (set(server.workers()) & old)
    kept = timed_get(cached)[2] == "HIT"
    return [Row("HUP reload", "c8 hits+misses for 10 s, HUP at 3 s", len(results),
                sum(1 for s, _, _ in results if s not in (200, 304)), [t for _, t, _ in results],
                notes=f"workers replaced: {replaced}; embedded cache kept: {kept}")]


def term(env: Env) -> list[Row]:
    """Stop: kill -TERM while 4 renders (w=1920 avif) are in flight."""
    server = env.gunicorn()
    assert server.process is not None
    before = set(Path(tempfile.gettempdir()).glob("image-proxy-*"))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(timed_get, env.url(server, f"v/term{i}/photos/{PHOTOS[i]}", w=1920, format="avif"))
                   for i in range(4)]
        time.sleep(0.3)
        sent = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        results = [f.result() for f in futures]
    code = server.process.wait(60)
    exited = time.monotonic() - sent
    leftovers = set(Path(tempfile.gettempdir()).glob("image-proxy-*")) - before
    return [Row("TERM stop", "4 in-flight w=1920 avif renders", len(results),
                sum(1 for s, _, _ in results if s != 200), [t for _, t, _ in results],
                recovery=f"exit {code} after {exited:.1f} s",
                notes=f"temp dirs left: {len(leftovers)}")]


HOLDER_FETCH_S = 8  # the holder's upstream fetch: slow-first/<this>, only its first request is slow
HOLDER_WAITERS = 6


def holder_killed(env: Env, redis_server: EmbeddedRedis) -> list[Row]:
    """The worker holding a key's 8 s upstream fetch is SIGKILLed; the next requests for that
    key, on another instance, must answer 200 within LOCK_EXPIRE + the fetch + 5 s. Both
    instances run the default lock expiry (read from their settings, not set)."""
    from bench.miss_model import lock_expiry, settings_of

    holder = env.gunicorn(redis_url=redis_server.url)
    waiter = env.gunicorn(redis_url=redis_server.url)
    expiry = lock_expiry(settings_of(waiter))
    limit = expiry + HOLDER_FETCH_S + 5
    path = f"slow-first/{HOLDER_FETCH_S}/photos/lunch_3264x1836.jpg"
    threading.Thread(target=timed_get, args=(env.url(holder, path, w=640),), daemon=True).start()
    give_up = time.monotonic() + 10
    while not env.upstream.hits["/" + path] and time.monotonic() < give_up:
        time.sleep(0.05)
    with ThreadPoolExecutor(HOLDER_WAITERS) as pool:
        futures = [pool.submit(timed_get, env.url(waiter, path, w=640)) for _ in range(HOLDER_WAITERS)]
        time.sleep(0.5)
        assert holder.process is not None
        killed = time.monotonic()
        for pid in holder.workers():
            os.kill(pid, signal.SIGKILL)
        results = [f.result() for f in futures]
    finished = time.monotonic() - killed
    slowest = max(t for _, t, _ in results)
    return [Row("lock holder SIGKILLed", f"{HOLDER_WAITERS} requests for the key on another instance, holder's "
                f"fetch {HOLDER_FETCH_S} s, default LOCK_EXPIRE", len(results),
                sum(1 for s, t, _ in results if s != 200 or t > limit), [t for _, t, _ in results],
                recovery=f"all answered {finished:.1f} s after the kill",
                notes=f"LOCK_EXPIRE {expiry:g} s (default); statuses {dict(Counter(s for s, _, _ in results))}, "
                f"slowest {slowest:.1f} s (target: 200 within {expiry:g} + {HOLDER_FETCH_S} + 5 = {limit:g} s); "
                f"upstream fetches: {env.upstream.hits['/' + path]}")]


STALL_S = 5.0
STALL_SLACK_S = 0.3  # issue #20: each answer within 300 ms of its no-Redis time
STALL_PATH = "photos/insect_2560x1280.jpg"


def _loop(url: str, stop_at: float, limit: int) -> list[Result]:
    results = []
    with requests.Session() as session:
        while time.monotonic() < stop_at and len(results) < limit:
            results.append(timed_get(url, session))
    return results


def _c4(url: str, seconds: float, limit: int = 200) -> list[Result]:
    stop_at = time.monotonic() + seconds
    with ThreadPoolExecutor(4) as pool:
        return [r for f in [pool.submit(_loop, url, stop_at, limit) for _ in range(4)] for r in f.result()]


def redis_stall(env: Env, redis_server: EmbeddedRedis) -> list[Row]:
    """redis-server paused (SIGSTOP) for 5 s under c4 load for a cached image, then resumed.
    Baseline: the same URL under the same load on an instance whose Redis is a socket that
    does not exist (every answer BYPASS at once, no Redis wait), stopped before the stall."""
    no_redis = env.gunicorn(redis_url=f"unix://{env.workdir}/no-redis.sock")
    baseline_url = env.url(no_redis, STALL_PATH, w=320)
    timed_get(baseline_url)
    baseline = _c4(baseline_url, 3.0)
    no_redis.stop()
    base = [t for s, t, _ in baseline if s == 200]
    base_p50 = statistics.median(base) if base else float("nan")

    server = env.gunicorn(redis_url=redis_server.url)
    url = env.url(server, STALL_PATH, w=320)
    timed_get(url)
    warm = timed_get(url)[2]
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        stalled = _c4(url, STALL_S)
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    resumed = time.monotonic()
    after: list[Result] = []
    with requests.Session() as session:  # tight: the first answer that is not BYPASS
        while time.monotonic() - resumed < 30 and len(after) < 2000:
            after.append(timed_get(url, session))
            if after[-1][2] in ("HIT", "MISS"):
                break
    back = time.monotonic() - resumed
    lat = sorted(t for _, t, _ in stalled)
    base_p95 = sorted(base)[min(len(base) - 1, int(len(base) * 0.95))] if base else float("nan")
    # Under c4 a request's no-Redis time is one draw from the baseline's spread (queueing
    # luck), so quantiles are compared with quantiles; one answer fails past baseline p95 + 300 ms.
    over = sum(1 for t in lat if t > base_p95 + STALL_SLACK_S)
    not_bypass = sum(1 for s, _, c in stalled if s != 200 or c != "BYPASS")
    recovered = bool(after) and after[-1][2] in ("HIT", "MISS")
    failures = over + not_bypass + (0 if recovered and back <= 1.0 else 1)
    p50 = statistics.median(lat) if lat else float("nan")
    p95 = lat[min(len(lat) - 1, int(len(lat) * 0.95))] if lat else float("nan")
    return [Row(f"Redis stalled {STALL_S:.0f} s", "c4 requests for a cached image (w=320)", len(stalled), failures,
                [t for _, t, _ in stalled],
                recovery=(f"{after[-1][2]} {back:.2f} s after SIGCONT ({len(after)} requests)" if recovered
                          else f"no HIT/MISS {back:.0f} s after SIGCONT"),
                notes=f"no-Redis baseline (dead socket, c4, {len(baseline)} requests): p50 {base_p50 * 1000:.0f} ms, "
                f"p95 {base_p95 * 1000:.0f} ms; stalled p50 {p50 * 1000:.0f} (+{(p50 - base_p50) * 1000:.0f}) ms, "
                f"p95 {p95 * 1000:.0f} (+{(p95 - base_p95) * 1000:.0f}) ms, max {lat[-1] * 1000:.0f} ms; "
                f"{over} over baseline p95 + {STALL_SLACK_S * 1000:.0f} ms; X-Cache before: {warm}, during: "
                f"{dict(Counter(c for _, _, c in stalled))}, statuses {dict(Counter(s for s, _, _ in stalled))} "
                "(target: all 200 BYPASS within 300 ms of baseline, HIT/MISS within 1 s of SIGCONT)")]


def redis_restart(env: Env) -> list[Row]:
    """Redis restarted empty while 16 waiters wait on a locked key."""
    port = free_port()
    servers = [start_embedded_redis(port=port)]
    try:
        server = env.gunicorn(redis_url=servers[0].url)
        path = "slow-first/3/photos/paddleboat_3264x1836.jpg"
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(timed_get, env.url(server, path, w=640)) for _ in range(16)]
            time.sleep(1)
            servers[-1].stop()
            servers.append(start_embedded_redis(port=port))
            restarted = time.monotonic()
            results = [f.result() for f in futures]
        settled = time.monotonic() - restarted
        after = timed_get(env.url(server, "photos/paddleboat_3264x1836.jpg", w=641))
        return [Row("Redis restarted empty", "16 waiters on a locked key", len(results),
                    sum(1 for s, _, _ in results if s != 200), [t for _, t, _ in results],
                    recovery=f"all answered {settled:.1f} s after the restart",
                    notes=f"next request: {after[0]} {after[2]}")]
    finally:
        servers[-1].stop()


def trickle(env: Env) -> list[Row]:
    """200 concurrent requests to upstreams that trickle one byte at a time (UPSTREAM_TIMEOUT 20 s)."""
    server = env.gunicorn()
    hit_url = env.url(server, "photos/waterfall_1800x1200.jpg", w=100)
    timed_get(hit_url)
    done = threading.Event()
    with ThreadPoolExecutor(1) as hitter:
        hits_future = hitter.submit(hit_loop, hit_url, done.is_set, 2000, 0.05)
        with ThreadPoolExecutor(200) as pool:
            results = list(pool.map(lambda i: timed_get(env.url(server, f"v/tr{i}/trickle?bytes=100000&every=0.2")),
                                    range(200)))
        done.set()
        hits = hits_future.result()
    statuses = {s: sum(1 for r in results if r[0] == s) for s in {r[0] for r in results}}
    return [
        Row("trickling upstreams", "200 concurrent, 1 byte / 0.2 s", len(results),
            sum(1 for s, _, _ in results if s not in (503, 504)), [t for _, t, _ in results],
            notes=", ".join(f"{n}x {s}" for s, n in sorted(statuses.items()))),
        Row("trickle: hits meanwhile", "1 client, hits in a loop", len(hits), sum(1 for s, _, _ in hits if s != 200),
            [t for _, t, _ in hits]),
    ]


def leaks(env: Env) -> list[Row]:
    """A bounded mixed run: hits, misses, upstream errors, bad input, clients that hang up."""
    server = env.gunicorn(workers="1")
    assert server.process is not None
    (worker,) = server.workers()
    mixed = [
        env.url(server, "photos/saw_2725x2225.jpg", w=120),
        env.url(server, "status/500"),
        env.url(server, "edge/random.bin"),
        env.url(server, "edge/bomb_png_100k.png"),
        f"{server.base}/image?url=nonsense&w=abc",
    ]

    def run(rounds: int) -> list[tuple[int, float, str]]:
        out = []
        with requests.Session() as session:
            for n in range(rounds):
                out.extend(timed_get(url, session) for url in mixed)
                out.append(timed_get(env.url(server, f"v/leak{rounds}-{n}/photos/portrait_1200x1800.jpg", w=90),
                                     session))
                with contextlib.suppress(requests.RequestException), requests.get(
                    mixed[0], stream=True, timeout=30
                ) as response:
                    response.raw.read(10)  # hang up mid-body
        return out

    def resources() -> tuple[int, int]:
        time.sleep(0.5)
        threads = int(next(line.split()[1] for line in Path(f"/proc/{worker}/status").read_text().splitlines()
                           if line.startswith("Threads:")))
        return len(os.listdir(f"/proc/{worker}/fd")), threads

    run(20)
    before = resources()
    results = run(150)
    after = resources()
    return [Row("no leaks", "900 mixed requests (+150 hang-ups)", len(results),
                sum(1 for s, _, _ in results if s == 500 or s < 0), [t for _, t, _ in results],
                notes=f"worker fds {before[0]} -> {after[0]}, threads {before[1]} -> {after[1]}")]


STALE_OUTAGE_S = 60.0


def stale(env: Env, outage: float = STALE_OUTAGE_S) -> list[Row]:
    """Upstream down (half the sources 503, half refusing) for `outage` seconds under load,
    after every cached variant's freshness ended: stale-if-error must answer all of them."""
    server = env.gunicorn(cache_ttl="2", stale_ttl="3600")
    paths = [f"validated/photos/{name}" for name in PHOTOS]
    urls = [env.url(server, path, w=w) for path in paths for w in (160, 480)]
    warmed = [timed_get(url)[0] for url in urls]
    time.sleep(2.5)  # CACHE_TTL is 2 s: every entry is now past its freshness
    for index, path in enumerate(paths):
        env.upstream.failing[path.split("/", 1)[1]] = 503 if index % 2 else "refuse"
    attempts_before = sum(env.upstream.hits["/" + path] for path in paths)
    stop_at = time.monotonic() + outage
    results: list[Result] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with requests.Session() as session:
            n = 0
            while time.monotonic() < stop_at and n < 20000:
                result = timed_get(urls[(index + n) % len(urls)], session)
                n += 1
                with lock:
                    results.append(result)
                time.sleep(0.005)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    attempts = sum(env.upstream.hits["/" + path] for path in paths) - attempts_before
    env.upstream.failing.clear()
    recovered = time.monotonic()
    # Back up: once the failure marker (ERROR_TTL, 10 s) lapses, a revalidation renews each.
    while timed_get(urls[0])[2] != "HIT" and time.monotonic() - recovered < 30:
        time.sleep(0.2)
    back = time.monotonic() - recovered
    caches = {c: sum(1 for _, _, x in results if x == c) for c in {x for _, _, x in results}}
    return [Row(f"upstream down {outage:.0f} s after freshness", f"c4 over {len(urls)} cached variants "
                f"({len(paths)} sources), 503 / refused", len(results),
                sum(1 for status, _, _ in results if status != 200) + sum(1 for s in warmed if s != 200),
                [t for _, t, _ in results], recovery=f"HIT {back:.1f} s after the upstream returned",
                notes=f"X-Cache {caches}; upstream attempts during the outage: {attempts} "
                "(one per source per ERROR_TTL at most)")]


SCENARIOS: dict[str, Callable[..., list[Row]]] = {
    "flood": flood,
    "burst": burst,
    "dedup": dedup,
    "hup": hup,
    "term": term,
    "holder": holder_killed,
    "stall": redis_stall,
    "restart": redis_restart,
    "trickle": trickle,
    "leaks": leaks,
    "hostile": hostile,
    "stale": stale,
    "gallery": gallery,
    "admission": admission,
    "kept": kept_sources,
}
NEEDS_REDIS = {"holder", "stall", "dedup"}


@contextlib.contextmanager
def environment() -> Iterator[Env]:
    with tempfile.TemporaryDirectory(prefix="image-proxy-chaos-") as workdir:
        env = Env(Path(workdir))
        try:
            yield env
        finally:
            env.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated scenario names: " + ", ".join(SCENARIOS))
    parser.add_argument("--dedup-rounds", type=int, default=DEDUP_ROUNDS, help="rounds per dedup case")
    parser.add_argument("--stale-seconds", type=float, default=STALE_OUTAGE_S,
                        help="how long the upstream stays down in the stale scenario")
    args = parser.parse_args(argv)
    SCENARIOS["dedup"] = functools.partial(dedup, rounds=args.dedup_rounds)
    SCENARIOS["stale"] = functools.partial(stale, outage=args.stale_seconds)
    chosen = [name for name in SCENARIOS if not args.only or name in args.only.split(",")]
    rows: list[Row] = []
    started = time.monotonic()
    for name in chosen:
        t0 = time.monotonic()
        with environment() as env:
            if name in NEEDS_REDIS:
                redis_server = start_embedded_redis(port=free_port())
                try:
                    rows.extend(SCENARIOS[name](env, redis_server))
                finally:
                    redis_server.stop()
            else:
                rows.extend(SCENARIOS[name](env))
        print(f"# {name}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    header = ["scenario", "load", "requests", "failures", "p50 ms", "p95 ms", "recovery", "notes"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")
    print(f"\nTotal {time.monotonic() - started:.0f} s on {os.cpu_count()} cores. "
          "failures = answers outside what the scenario allows (e.g. a 5xx that is not 503/504, a connection error).")
    return 0 if all(row.failures == 0 for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
