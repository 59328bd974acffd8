"""Nothing of one upstream fetch carries over to another: no cookie is stored or sent.

The fetcher's session is shared by every user's fetches in a worker, so a cookie one
upstream sets would otherwise be sent on later fetches for other users and other sites.
The loopback upstream's /set-cookies route sets every kind (plain, Path, Domain= own host,
parent domain and IP, long-lived) and can flood; /echo shows what the next fetch sent.
Made-up .test names resolve to 127.0.0.1 through a stub resolver.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from app.fetch import Fetcher
from app.guard import URLPolicy, parse_source_url
from tests.unit.test_fetch_guard import PHOTO, StubResolver, make_fetcher

HOSTS = ["a.shared.test", "b.shared.test", "other.test"]


@pytest.fixture
def fetcher() -> Iterator[Fetcher]:
    made = make_fetcher(StubResolver({host: ["127.0.0.1"] for host in HOSTS}))
    yield made
    made.close()


def get(fetcher: Fetcher, url: str) -> bytes:
    return fetcher.fetch_source(parse_source_url(url), URLPolicy()).body


def sent_cookies(upstream) -> list[str]:
    return [headers["Cookie"] for headers in upstream.headers_seen if "Cookie" in headers]


@pytest.mark.parametrize("setter", [*HOSTS, "127.0.0.1"])
def test_cookies_an_upstream_sets_are_never_sent_on_later_fetches(fetcher, upstream, setter):
    get(fetcher, f"http://{setter}:{upstream.port}/set-cookies")
    assert upstream.hits["/set-cookies"] == 1
    for host in [*HOSTS, "127.0.0.1"]:
        echoed = json.loads(get(fetcher, f"http://{host}:{upstream.port}/echo"))
        assert "Cookie" not in echoed, f"{setter}'s cookies were sent to {host}"
    assert len(fetcher.session.cookies) == 0
    assert sent_cookies(upstream) == []


def test_cookies_set_on_a_redirect_are_not_sent_to_the_next_hop(fetcher, upstream):
    then = quote("/redirect/1/echo", safe="")
    echoed = json.loads(get(fetcher, f"http://a.shared.test:{upstream.port}/set-cookies?then={then}"))
    assert upstream.hits["/redirect/1/echo"] == 1
    assert "Cookie" not in echoed
    assert sent_cookies(upstream) == []


def test_a_flood_of_large_cookies_does_not_break_later_fetches(fetcher, upstream, corpus):
    # 80 cookies of 4 KB: sent back they would be a 320 KB Cookie header, far over what any
    # server reads (the test upstream, like most, refuses a header line over 64 KB).
    get(fetcher, f"http://a.shared.test:{upstream.port}/set-cookies?flood=80&size=4000")
    for host in HOSTS:
        assert get(fetcher, f"http://{host}:{upstream.port}/{PHOTO}") == (corpus / PHOTO).read_bytes()
    assert sent_cookies(upstream) == []


def test_image_requests_do_not_pass_one_upstreams_cookies_to_the_next(client, upstream):
    # Each source is a redirect that sets cookies (Path=/ among them), then the photo.
    for nonce in ("first", "second", "third"):
        then = quote(f"/v/{nonce}/{PHOTO}", safe="")
        source = quote(upstream.url(f"v/{nonce}/set-cookies?then={then}"), safe="")
        assert client.get(f"/image?url={source}&w=32").status_code == 200
    assert upstream.hits[f"/{PHOTO}"] == 3
    assert sent_cookies(upstream) == []
