"""How soon do dedup waiters finish after the one request that renders?

Starts the service (gunicorn.conf.py defaults) and a loopback upstream, then, ROUNDS times,
sends 32 concurrent identical never-seen requests (a 10 MP JPEG to 640 px WebP) and records
when each response ended. The request answered MISS rendered; the others waited on its lock.
Prints the upstream fetches per round and the p50/p95/max of (waiter's end - renderer's end).

    python -m bench.dedup [--rounds 5] [--clients 32]
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from bench.run import image_path, upstream_and_service


def one_round(port: int, path: str, clients: int) -> list[tuple[float, str]]:
    barrier = threading.Barrier(clients)

    def fetch(_: int) -> tuple[float, str]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.connect()
        barrier.wait()
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        ended = time.perf_counter()
        connection.close()
        return ended, response.getheader("X-Cache", "") if response.status == 200 else f"status {response.status}"

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(fetch, range(clients)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args(argv)
    gaps: list[float] = []
    misses: list[int] = []
    with upstream_and_service("image-proxy-dedup-") as (server, up, _):
        for _ in range(args.rounds):
            path = image_path(up, "panda_3872x2592.jpg", 640, "webp", 75, uuid.uuid4().hex)
            results = one_round(server.port, path, args.clients)
            rendered = [ended for ended, cache in results if cache == "MISS"]
            misses.append(len(rendered))
            if len(rendered) == 1:
                gaps.extend(ended - rendered[0] for ended, cache in results if cache == "HIT")
    gaps_ms = sorted(g * 1000 for g in gaps)
    print(f"{args.rounds} rounds x {args.clients} identical misses; renders per round: {misses}")
    if gaps_ms:
        p95 = gaps_ms[int(len(gaps_ms) * 0.95)]
        print(f"waiter end - renderer end: p50 {statistics.median(gaps_ms):.1f} ms, p95 {p95:.1f} ms, "
              f"max {gaps_ms[-1]:.1f} ms ({len(gaps_ms)} waiters)")
    return 0 if misses and all(m == 1 for m in misses) else 1


if __name__ == "__main__":
    raise SystemExit(main())
