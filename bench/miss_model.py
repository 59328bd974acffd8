"""`make chaos` rows for issue #20 ("One miss path, one model"), measured from outside only.

    gallery     two w=0 AVIF renders of distinct 48 MP JPEGs, then 24 thumbnail misses:
                do the thumbnails wait behind the big reservations? (MEMORY_BUDGET=2G)
    admission   renders longer than a 2 s budget, then a small miss on the idle worker:
                is it served, or locked out by the render-time average?
    kept        200 small variants, then 40 large (~7 MB) and 40 junk (8 MB) sources:
                do kept sources push the rendered images out of the 256 MB Redis?

Each row starts its own gunicorn and talks to it over HTTP on 127.0.0.1 only, so it runs
the same against any version of the app. Every loop is bounded in count and time.

    python -m bench.chaos --only gallery,admission,kept
    (all of the issue's rows: --only gallery,holder,stall,admission,kept,hostile,dedup)
"""

from __future__ import annotations

import io
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import redis

from app.embedded_redis import start_embedded_redis
from app.settings import Settings
from bench.hostile import BUDGET, _noise, noisy_48mp_jpeg
from tests.processes import wait_idle

if TYPE_CHECKING:
    from bench.chaos import Env, Result, Row
    from tests.conftest import Gunicorn

MB = 1000 * 1000
GALLERY_THUMBS = 24
THUMB_TARGET_S = 3.0  # issue #20: the slowest of the 24 thumbnails
#: A 27 MP noisy JPEG: its w=0 AVIF takes about 5.5 s on one core here, past a 2 s budget.
SLOW_RENDER_SIZE = (6000, 4500)
ADMISSION_BUDGET = "2"
ADMISSION_ROUNDS = 3
KEPT_SMALL = 200
KEPT_LARGE = 40
KEPT_JUNK = 40
LARGE_SOURCE_BYTES = 7 * MB
JUNK_BYTES = 8 * MB  # under SOURCE_MAX_BYTES (8 MiB), so the old code keeps it
HIT_TARGET = 0.9


def settings_of(server: Gunicorn) -> Settings:
    """The settings an instance runs with: its IMAGE_PROXY_* environment over the defaults."""
    return Settings.from_env(server.env)


def lock_expiry(settings: Settings) -> float:
    """The render-lock expiry an instance runs with (LOCK_EXPIRE, or its derived default)."""
    derived = getattr(settings, "lock_seconds", None)
    return float(derived if derived is not None else settings.lock_expire)


def noisy_jpeg(size: tuple[int, int], seed: int, quality: int = 80) -> bytes:
    buffer = io.BytesIO()
    _noise(size, seed).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def noisy_jpeg_under(limit: int, seed: int) -> bytes:
    """A 12 MP noisy JPEG at the highest quality that stays at or under `limit` bytes."""
    for quality in (90, 85, 80, 75, 70, 60, 50):
        data = noisy_jpeg((4000, 3000), seed, quality)
        if len(data) <= limit:
            return data
    raise RuntimeError(f"no 12 MP noisy JPEG fits in {limit} bytes")


def _ms(seconds: Iterable[float]) -> str:
    return "/".join(f"{s * 1000:.0f}" for s in seconds)


def _wait_for_hits(hits: Callable[[], bool], limit: float = 20.0) -> None:
    give_up = time.monotonic() + limit
    while not hits() and time.monotonic() < give_up:
        time.sleep(0.02)


# -- gallery -------------------------------------------------------------------------------


def gallery(env: Env) -> list[Row]:
    """A cold gallery under the shipped unit's budget: 2 w=0 AVIF renders of distinct 48 MP
    JPEGs in flight, then 24 distinct w=320 thumbnails. Target: all 24 are 200, the slowest
    within 3 s; each big one 200 or 503 within REQUEST_BUDGET."""
    from bench.chaos import PHOTOS, Row, timed_get

    bigs = ("big1.jpg", "big2.jpg")
    for seed, name in enumerate(bigs, 1):
        env.upstream.blobs[name] = noisy_48mp_jpeg(seed)
    server = env.gunicorn(memory_budget=BUDGET)
    budget = settings_of(server).request_budget
    give_up = time.monotonic() + 20  # /healthz answers once the first worker is up
    while len(server.workers()) < settings_of(server).workers and time.monotonic() < give_up:
        time.sleep(0.1)
    with ThreadPoolExecutor(len(bigs) + GALLERY_THUMBS) as pool:
        big_futures = [pool.submit(timed_get, env.url(server, f"blob/{name}", w=0, format="avif")) for name in bigs]
        _wait_for_hits(lambda: all(env.upstream.hits[f"/blob/{name}"] for name in bigs))
        time.sleep(0.5)  # both bodies fetched (loopback) and reserved: the big renders are in flight
        thumbs = list(pool.map(
            lambda i: timed_get(env.url(server, f"v/gallery{i}/photos/{PHOTOS[i % len(PHOTOS)]}", w=320)),
            range(GALLERY_THUMBS),
        ))
        big_results = [future.result() for future in big_futures]
    thumb_times = [t for _, t, _ in thumbs]
    thumb_bad = sum(1 for s, t, _ in thumbs if s != 200 or t > THUMB_TARGET_S)
    big_bad = sum(1 for s, t, _ in big_results if s not in (200, 503) or t > budget + 0.5)
    return [
        Row("gallery: thumbnails", f"{GALLERY_THUMBS} distinct w=320 misses while 2 w=0 AVIF renders of distinct "
            f"48 MP JPEGs run, MEMORY_BUDGET={BUDGET}", len(thumbs), thumb_bad, thumb_times,
            notes=f"statuses {dict(Counter(s for s, _, _ in thumbs))}; max {max(thumb_times) * 1000:.0f} ms "
            f"(target: all 200, max <= {THUMB_TARGET_S:.0f} s); failures = not 200 or slower than that"),
        Row("gallery: big renders", "2 w=0 AVIF, distinct 48 MP noisy JPEGs", len(big_results), big_bad,
            [t for _, t, _ in big_results],
            notes=f"statuses/ms: {', '.join(f'{s} {t * 1000:.0f}' for s, t, _ in big_results)} "
            f"(target: 200 or 503 within REQUEST_BUDGET {budget:.0f} s + 0.5 s)"),
    ]


# -- admission -----------------------------------------------------------------------------


def admission(env: Env) -> list[Row]:
    """REQUEST_BUDGET=2, one worker: renders that take longer than the budget (they may 503),
    then, once the worker is idle, a small miss. Target: every small miss answers 200."""
    from bench.chaos import Row, timed_get

    env.upstream.blobs["slow-render.jpg"] = noisy_jpeg(SLOW_RENDER_SIZE, 5)
    server = env.gunicorn(request_budget=ADMISSION_BUDGET, workers="1")
    workers = server.workers()
    big_results: list[Result] = []
    small_results: list[Result] = []
    idle_waits = []
    for round_ in range(ADMISSION_ROUNDS):
        for i in range(2):  # one after the other: each completed render moves the average
            big_results.append(timed_get(env.url(server, f"v/adm{round_}-{i}/blob/slow-render.jpg",
                                                  w=0, format="avif")))
        idle_waits.append(wait_idle(workers))
        small_results.append(timed_get(env.url(server, f"v/adm{round_}/photos/portrait_1200x1800.jpg",
                                                w=64, format="webp")))
    budget = settings_of(server).request_budget
    bad = (sum(1 for s, _, _ in small_results if s != 200)
           + sum(1 for s, t, _ in big_results if s not in (200, 503) or t > budget + 0.5))
    return [Row(f"admission after renders past the budget (REQUEST_BUDGET={ADMISSION_BUDGET}, WORKERS=1)",
                f"{ADMISSION_ROUNDS} rounds: 2 w=0 AVIF of a {SLOW_RENDER_SIZE[0] * SLOW_RENDER_SIZE[1] / 1e6:.0f} MP "
                "noisy JPEG, one after the other, then (worker idle) 1 w=64 webp miss",
                len(small_results), bad, [t for _, t, _ in small_results],
                notes=f"small misses: {', '.join(f'{s} in {t * 1000:.0f} ms' for s, t, _ in small_results)} "
                f"(target: all 200); big: {', '.join(f'{s} {t:.1f}s' for s, t, _ in big_results)} "
                f"(200 or 503 within the budget + 0.5 s allowed); idle after {_ms(idle_waits)} ms; "
                "p50/p95 = small misses")]


# -- kept sources --------------------------------------------------------------------------


def kept_sources(env: Env) -> list[Row]:
    """200 small variants, then 40 large (~7 MB) sources and 40 junk bodies (8 MB, random):
    at least 90 % of the 200 must still HIT. The row starts its own redis-server exactly as
    the embedded one is started (maxmemory = the REDIS_MAXMEMORY default, allkeys-lru) and
    passes it as REDIS_URL, so its INFO can be read."""
    from bench.chaos import Row, timed_get

    maxmemory = Settings().redis_maxmemory
    redis_server = start_embedded_redis(maxmemory=maxmemory)
    client = redis.Redis.from_url(redis_server.url)
    try:
        env.upstream.blobs["large.jpg"] = noisy_jpeg_under(int(7.4 * MB), 11)
        env.upstream.blobs["junk.bin"] = random.Random(20).randbytes(JUNK_BYTES)
        server = env.gunicorn(redis_url=redis_server.url)
        small = [env.url(server, f"v/keep{i}/photos/portrait_1200x1800.jpg", w=64) for i in range(KEPT_SMALL)]
        large = [env.url(server, f"v/large{i}/blob/large.jpg", w=64) for i in range(KEPT_LARGE)]
        junk = [env.url(server, f"blob/junk.bin?v={i}") for i in range(1, KEPT_JUNK + 1)]
        with ThreadPoolExecutor(8) as pool:
            first = list(pool.map(timed_get, small))
            mid = _redis_view(client)
            large_results = list(pool.map(timed_get, large))
            junk_started = time.monotonic()
            junk_results = list(pool.map(timed_get, junk))
            junk_seconds = time.monotonic() - junk_started
            again = list(pool.map(timed_get, small))
        end = _redis_view(client)
    finally:
        client.close()
        redis_server.stop()
    hits = sum(1 for s, _, c in again if s == 200 and c == "HIT")
    fraction = hits / len(again)
    bad = (sum(1 for s, _, _ in first + large_results if s != 200) + sum(1 for s, _, _ in junk_results if s != 400)
           + (0 if fraction >= HIT_TARGET else 1))
    return [Row("kept sources vs rendered images", f"Redis maxmemory {maxmemory // 2**20} MB: {KEPT_SMALL} w=64 "
                f"variants, then {KEPT_LARGE} ~{len(env.upstream.blobs['large.jpg']) / MB:.1f} MB sources (w=64), "
                f"then {KEPT_JUNK} junk bodies of {JUNK_BYTES / MB:.0f} MB (?v=1..{KEPT_JUNK}), then the "
                f"{KEPT_SMALL} again", len(again), bad, [t for _, t, _ in again],
                notes=f"HIT {hits}/{len(again)} = {fraction:.0%} (target >= {HIT_TARGET:.0%}); "
                f"evicted_keys {end['evicted']:.0f} (after the {KEPT_SMALL}: {mid['evicted']:.0f}); "
                f"kept-source keys ip:{{*}}:src {mid['src']:.0f} -> {end['src']:.0f}, "
                f"variant keys ip:*:v:* {mid['v']:.0f} -> {end['v']:.0f}; "
                f"used_memory {mid['used_mb']:.0f} -> {end['used_mb']:.0f} MB; "
                f"first pass {dict(Counter(s for s, _, _ in first))}, "
                f"large {dict(Counter(s for s, _, _ in large_results))}, "
                f"junk {dict(Counter(s for s, _, _ in junk_results))} in {junk_seconds:.1f} s (400 expected); "
                "own redis-server started like the embedded one, passed as REDIS_URL; p50/p95 = the re-requests")]


def _redis_view(client: redis.Redis) -> dict[str, float]:
    info = client.info()
    return {
        "evicted": float(info.get("evicted_keys", 0)),
        "used_mb": float(info.get("used_memory", 0)) / 2**20,
        "src": float(sum(1 for _ in client.scan_iter(match="ip:{*}:src", count=1000))),
        "v": float(sum(1 for _ in client.scan_iter(match="ip:*:v:*", count=1000))),
    }
