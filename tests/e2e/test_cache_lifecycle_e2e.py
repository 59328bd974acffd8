"""Cache lifecycle across processes: a srcset family on real gunicorn (one instance, and two
sharing one Redis) costs one upstream download; purge and revalidation on a real 3-node
Redis Cluster."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest
import requests
from redis.cluster import RedisCluster

from app import create_app
from app.guard import parse_source_url
from app.image.params import source_digest
from tests.e2e.test_scale_out import cluster  # noqa: F401 (the fixture)

pytestmark = pytest.mark.e2e

PHOTO = "photos/lunch_3264x1836.jpg"
TOKEN = "e2e-admin-token-0123456789"
FAMILY = [(w, f) for w in (160, 320, 480, 640, 800) for f in ("webp", "avif")]


@pytest.mark.parametrize("instances", [1, 2])
def test_a_cold_srcset_family_costs_one_download_across_instances(start_gunicorn, redis_server, redis_client,
                                                                   upstream, instances):
    servers = [start_gunicorn(redis_url=redis_server.url) for _ in range(instances)]
    source = quote(upstream.url(f"validated/{PHOTO}"), safe="")
    barrier = threading.Barrier(len(FAMILY))

    def one(index: int) -> tuple[int, str]:
        width, fmt = FAMILY[index]
        base = servers[index % instances].base
        with requests.Session() as session:
            barrier.wait()
            try:
                response = session.get(f"{base}/image?url={source}&w={width}&format={fmt}", timeout=60)
            except requests.ConnectionError as exc:
                # Seen once in a full clean-clone run (the server closed a connection without an
                # answer): kept as a result, so the assertion below shows it with the server logs.
                return 0, repr(exc)
            return response.status_code, response.headers.get("X-Cache", "")

    with ThreadPoolExecutor(len(FAMILY)) as pool:
        results = list(pool.map(one, range(len(FAMILY))))
    print(f"{instances} instance(s): {results}; upstream bodies {upstream.bodies[PHOTO]}")
    logs = "\n".join(server.log() for server in servers)
    assert results == [(200, "MISS")] * len(FAMILY), f"ten variants, ten renders; server logs:\n{logs}"
    assert upstream.bodies[PHOTO] == 1, "one upstream download for the whole family"
    assert len(list(redis_client.scan_iter(match="ip:*:v:*"))) == len(FAMILY)


def cluster_keys(client: RedisCluster, digest: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"ip:{{{digest}}}:*", target_nodes=RedisCluster.ALL_NODES))


def test_purge_and_revalidation_on_a_redis_cluster(cluster, settings, upstream):  # noqa: F811
    app = create_app(settings.replace(redis_url=cluster.url, redis_cluster=True, cache_ttl=1, stale_ttl=30,
                                      admin_token=TOKEN))
    client = app.test_client()
    url = upstream.url(f"validated/{PHOTO}")
    path = f"/image?url={quote(url, safe='')}"
    for params in ("&w=100", "&w=100&format=avif", "&w=200&q=40"):
        response = client.get(path + params)
        assert (response.status_code, response.headers["X-Cache"]) == (200, "MISS")
    assert upstream.bodies[PHOTO] == 1

    # Freshness ends; one conditional request renews every variant (one slot: one MGET).
    time.sleep(1.2)
    assert [client.get(path + p).headers["X-Cache"] for p in ("&w=100", "&w=200&q=40")] == ["HIT", "HIT"]
    assert (upstream.conditional[PHOTO], upstream.not_modified[PHOTO], upstream.bodies[PHOTO]) == (1, 1, 1)

    nodes = RedisCluster.from_url(cluster.url)
    digest = source_digest(parse_source_url(url))
    # Entries only: the claims' short-lived keys (lock, wake-up signal, handoff) are not cached images.
    claim_keys = (b":l:", b":wake:", b":h:", b":p:")
    found = [key for key in cluster_keys(nodes, digest) if not any(part in key for part in claim_keys)]
    before = [key for key in found if b":v:" in key or key.endswith(b":src")]
    assert len(before) == 4, before
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/admin/purge", headers=auth, json={"url": url}).json == {"purged": 4}
    after = [key for key in cluster_keys(nodes, digest) if not any(part in key for part in claim_keys)
             and (b":v:" in key or b":src" in key or key.endswith(b":r"))]
    assert after == []
    assert client.post("/admin/purge", headers=auth, json={"url": url}).json == {"purged": 0}
    assert client.get(path + "&w=100").headers["X-Cache"] == "MISS"
    assert upstream.bodies[PHOTO] == 2
    nodes.close()
