"""Rounds of N concurrent identical requests for a never-seen URL, counted at the upstream.

Shared by the dedup stress test (tests/e2e/test_dedup_stress.py, 30 rounds per case) and
`make chaos` (200 rounds per case): every round must cost exactly one upstream fetch and
answer every request 200 with the same body.
"""

from __future__ import annotations

import http.client
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

from tests.upstream import Upstream


@dataclass
class RoundsResult:
    rounds: int = 0
    fetches: Counter[int] = field(default_factory=Counter)  # fetches per round -> rounds
    statuses: Counter[int] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)  # X-Cache values
    rounds_with_distinct_bodies: int = 0
    bad_rounds: list[str] = field(default_factory=list)

    @property
    def exactly_once(self) -> bool:
        return set(self.fetches) == {1} and set(self.statuses) == {200} and not self.rounds_with_distinct_bodies

    def summary(self) -> str:
        per_round = ", ".join(f"{n} fetch(es): {count} rounds" for n, count in sorted(self.fetches.items()))
        return f"{self.rounds} rounds; {per_round}; statuses {dict(self.statuses)}; X-Cache {dict(self.cache)}"


def one_round(bases: list[str], upstream: Upstream, source_path: str, clients: int, timeout: float = 60) -> tuple[
        int, list[int], int, list[str]]:
    """One round: `clients` requests spread over `bases` (service URLs), released together.
    Returns (upstream fetches, statuses, distinct 200 bodies, X-Cache values)."""
    nonce = uuid.uuid4().hex
    source = upstream.url(f"v/{nonce}/{source_path}")
    counted = "/" + source_path.lstrip("/")
    before = upstream.hits[counted]
    path = f"/image?url={quote(source, safe='')}&w=64"
    barrier = threading.Barrier(clients)

    def fetch(index: int) -> tuple[int, bytes, str]:
        base = urlsplit(bases[index % len(bases)])
        connection = http.client.HTTPConnection(base.hostname, base.port, timeout=timeout)
        try:
            connection.connect()
            barrier.wait(timeout)
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read(), response.getheader("X-Cache", "")
        finally:
            connection.close()

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(fetch, range(clients)))
    bodies = {body for status, body, _ in results if status == 200}
    statuses = [status for status, _, _ in results]
    return upstream.hits[counted] - before, statuses, len(bodies), [cache for _, _, cache in results]


def run_rounds(
    bases: list[str], upstream: Upstream, source_path: str, *, rounds: int, clients: int = 48
) -> RoundsResult:
    result = RoundsResult()
    for index in range(rounds):
        fetches, statuses, distinct, cache = one_round(bases, upstream, source_path, clients)
        result.cache.update(cache)
        result.rounds += 1
        result.fetches[fetches] += 1
        result.statuses.update(statuses)
        if distinct > 1:
            result.rounds_with_distinct_bodies += 1
        if fetches != 1 or set(statuses) != {200} or distinct != 1:
            result.bad_rounds.append(f"round {index}: {fetches} fetches, statuses {Counter(statuses)}, "
                                     f"{distinct} bodies, X-Cache {Counter(cache)}")
    return result
