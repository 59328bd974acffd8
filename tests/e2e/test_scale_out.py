"""Several instances sharing one Redis, and a real 3-node Redis Cluster."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import requests
from redis.cluster import RedisCluster

from app.cache import KEPT_INDEX, KEPT_SIZES, CacheKey
from app.embedded_redis import EmbeddedRedis, find_redis_server, start_embedded_redis
from app.factory import create_app

pytestmark = pytest.mark.e2e

PHOTO = "photos/lunch_3264x1836.jpg"


def test_two_instances_sharing_one_redis_render_once_and_share_hits(start_gunicorn, redis_server, redis_client,
                                                                     upstream):
    one = start_gunicorn(redis_url=redis_server.url, workers="2")
    two = start_gunicorn(redis_url=redis_server.url, workers="2")
    source = quote(upstream.url("slow-image/0.5/" + PHOTO), safe="")
    urls = [f"{server.base}/image?url={source}&w=360" for server in (one, two)]
    barrier = threading.Barrier(32)

    def fetch(index: int) -> tuple[int, bytes, str]:
        with requests.Session() as session:
            barrier.wait()
            response = session.get(urls[index % 2], timeout=30)
            return response.status_code, response.content, response.headers["X-Cache"]

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(fetch, range(32)))
    assert [status for status, _, _ in results] == [200] * 32
    assert len({body for _, body, _ in results}) == 1
    assert [cache for _, _, cache in results].count("MISS") == 1, "one render across both instances"
    assert upstream.hits["/slow-image/0.5/" + PHOTO] == 1, "one upstream fetch across both instances"

    # A hit rendered by one instance is served by the other.
    fresh = quote(upstream.url(PHOTO), safe="")
    first = requests.get(f"{one.base}/image?url={fresh}&w=123", timeout=30)
    second = requests.get(f"{two.base}/image?url={fresh}&w=123", timeout=30)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert first.headers["ETag"] == second.headers["ETag"]


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too; both must be <= 65535."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 45000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free cluster port pair")


class Cluster:
    """Three cluster-enabled redis-servers on loopback ports, joined with redis-cli."""

    def __init__(self) -> None:
        self.nodes: list[EmbeddedRedis] = []
        self.ports = [cluster_port() for _ in range(3)]
        for port in self.ports:
            self.nodes.append(start_embedded_redis(port=port, extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "2000",
            )))
        try:
            self._join()
        except BaseException:
            self.stop()
            raise

    def _join(self) -> None:
        cli = Path(find_redis_server()).with_name("redis-cli")
        subprocess.run(
            [str(cli), "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )
        give_up = time.monotonic() + 20
        while time.monotonic() < give_up:
            # Every node, not only the first: a node that has not yet seen the others answers
            # CLUSTERDOWN for its slots.
            states = []
            for port in self.ports:
                with redis.Redis(port=port) as node:
                    states.append(node.cluster("INFO").get("cluster_state"))
            if states == ["ok"] * len(self.ports):
                return
            time.sleep(0.1)
        raise RuntimeError("cluster did not become ok")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def cluster():
    if not os.access(Path(find_redis_server()).with_name("redis-cli"), os.X_OK):
        pytest.skip("redis-cli is not next to redis-server")
    nodes = Cluster()
    yield nodes
    nodes.stop()


def test_redis_cluster_caches_and_dedups_with_hash_tagged_keys(cluster, settings, upstream):
    app = create_app(settings.replace(redis_url=cluster.url, redis_cluster=True))
    path = f"/image?url={quote(upstream.url('slow-image/0.3/' + PHOTO), safe='')}&w=240"
    barrier = threading.Barrier(8)

    def fetch(_: int) -> tuple[int, str]:
        client = app.test_client()
        barrier.wait()
        response = client.get(path)
        return response.status_code, response.headers["X-Cache"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(fetch, range(8)))
    assert [status for status, _ in results] == [200] * 8
    assert [cache for _, cache in results].count("MISS") == 1
    assert [cache for _, cache in results].count("BYPASS") == 0
    assert upstream.hits["/slow-image/0.3/" + PHOTO] == 1
    assert app.test_client().get(path).headers["X-Cache"] == "HIT"
    assert app.test_client().get("/healthz").status_code == 200

    # Every key of one source (entry, lock, wake-up signal, handoff, pass marker) lives in
    # one slot, so the finish script can touch them together; so do the kept-source index's.
    client = RedisCluster.from_url(cluster.url)
    key, other_variant = CacheKey("abc", "v1"), CacheKey("abc", "v2")
    keys = [key.entry, "lock:" + key.lock, key.wake, key.handoff, key.passed, other_variant.entry]
    assert len({client.keyslot(key) for key in keys}) == 1
    assert client.keyslot(KEPT_INDEX) == client.keyslot(KEPT_SIZES)
    stored = list(client.scan_iter(match="ip:*:v:*", target_nodes=RedisCluster.ALL_NODES))
    assert len(stored) == 1
    client.close()


def test_a_redis_cluster_that_is_gone_gives_bypass_not_500(cluster, settings, upstream):
    # RedisCluster raises RedisClusterException (not a RedisError) when no node answers.
    app = create_app(settings.replace(redis_url=cluster.url, redis_cluster=True))
    path = f"/image?url={quote(upstream.url(PHOTO), safe='')}&w=120"
    assert app.test_client().get(path).headers["X-Cache"] == "MISS"
    cluster.stop()
    response = app.test_client().get(path)
    assert response.status_code == 200 and response.headers["X-Cache"] == "BYPASS"
    assert app.test_client().get("/healthz").status_code == 503
