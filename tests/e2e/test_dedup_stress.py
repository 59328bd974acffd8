"""Dedup under real concurrency, many rounds: one instance and two sharing one Redis, fast and
slow upstreams. A race that shows once in twenty rounds fails here; `make chaos` runs the
same rounds 200 times per case (tests/dedup_rounds.py)."""

from __future__ import annotations

import os

import pytest

from tests.dedup_rounds import run_rounds

pytestmark = pytest.mark.e2e

ROUNDS = int(os.environ.get("DEDUP_ROUNDS", "30"))
SOURCES = {
    "fast": "photos/portrait_1200x1800.jpg",
    # The holder's fetch is still open while all 48 requests arrive and wait.
    "slow": "slow-image/0.3/photos/portrait_1200x1800.jpg",
}


@pytest.mark.parametrize("upstream_speed", ["fast", "slow"])
@pytest.mark.parametrize("instances", [1, 2])
def test_48_identical_requests_fetch_once_in_every_round(start_gunicorn, redis_server, upstream, instances,
                                                         upstream_speed):
    servers = [start_gunicorn(redis_url=redis_server.url) for _ in range(instances)]
    result = run_rounds([server.base for server in servers], upstream, SOURCES[upstream_speed], rounds=ROUNDS)
    print(result.summary())
    assert not result.bad_rounds, result.summary() + "\n" + "\n".join(result.bad_rounds[:10])
    assert result.fetches == {1: ROUNDS}
