"""`make soak`: is the service's memory flat over a long bounded run?

Starts the service (gunicorn.conf.py defaults, embedded Redis) and a loopback upstream,
then sends REQUESTS requests at concurrency 4: 60 % hits over 60 cached URLs, 40 % misses
(fresh upstream URL; WebP at 640 and 320, AVIF at 320). The summed RSS of the whole tree
(master, workers, embedded Redis) is sampled every 50 ms, and after each tenth of the run the
RSS of the gunicorn processes and of the embedded Redis are recorded apart: every miss adds
a cache entry, so Redis grows by design until its maxmemory and then evicts. Flat = the
gunicorn processes' RSS in the last tenth within 10 % of their RSS after the first tenth
(warm-up: thread pools and connection pools filled).

    python -m bench.soak [--requests 10000] [--conc 4]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid

from bench.run import PHOTOS, Monitor, image_path, load, rss, upstream_and_service
from tests.processes import is_redis, tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--conc", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)

    rows = []
    errors = 0
    started = time.monotonic()
    misses = [(640, "webp"), (320, "webp"), (320, "avif")]
    with upstream_and_service("image-proxy-soak-") as (server, up, _):
        assert server.process is not None
        cached = [image_path(up, photo, w, "webp", 75, "soak") for photo in PHOTOS for w in range(100, 700, 100)][:60]
        plan = [
            rng.choice(cached) if rng.random() < 0.6
            else image_path(up, rng.choice(PHOTOS), *rng.choice(misses), 75, uuid.uuid4().hex)  # type: ignore[misc]
            for _ in range(args.requests)
        ]
        load(server.port, cached, 2)  # prime the hits
        tenth = max(1, len(plan) // 10)
        with Monitor(server.process.pid) as monitor:
            for index in range(0, len(plan), tenth):
                seconds, _, _, failed = load(server.port, plan[index : index + tenth], args.conc)
                errors += failed
                pids = tree(server.process.pid)
                redis_pids = [pid for pid in pids if is_redis(pid)]
                service = sum(rss(pid) for pid in pids if pid not in redis_pids)
                cache = sum(rss(pid) for pid in redis_pids)
                done = min(index + tenth, len(plan))
                rows.append((done, service, cache, monitor.peak, len(plan[index : index + tenth]) / seconds))
                print(f"# {done} requests, gunicorn {service / 2**20:.0f} MB, redis {cache / 2**20:.0f} MB",
                      file=sys.stderr, flush=True)
    print("| requests done | gunicorn RSS MB | embedded Redis RSS MB | tree peak so far MB | req/s in this tenth |")
    print("|---|---|---|---|---|")
    for done, service, cache, peak, rate in rows:
        print(f"| {done} | {service / 2**20:.0f} | {cache / 2**20:.0f} | {peak / 2**20:.0f} | {rate:.1f} |")
    warm, last = rows[0][1], rows[-1][1]
    drift = (last - warm) / warm * 100
    print(f"\ngunicorn processes: after warm-up {warm / 2**20:.0f} MB, at the end {last / 2**20:.0f} MB "
          f"({drift:+.1f} %); whole tree peak {rows[-1][3] / 2**20:.0f} MB; {errors} failed requests; "
          f"{time.monotonic() - started:.0f} s")
    print("flat (within 10 %)" if abs(drift) <= 10 else "NOT flat (over 10 %)")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
