"""The guarded dialer: resolve once, check every address, connect to a checked one.

A stub resolver stands in for DNS, and `socket.socket.connect` is wrapped so every connect
attempt is recorded and any target outside loopback is refused before the real connect runs:
even a guard bug could not open a connection off this machine. A dead address is a loopback
one where nothing listens (refused) or a `Blackhole` (connect hangs, as on a dead route).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterator
from urllib.parse import quote

import pytest

from app.errors import LoopDetected, SourceNotAllowed, UpstreamFailed, UpstreamTimeout
from app.fetch import ATTEMPT_CAP, ATTEMPT_FLOOR, Fetcher, attempt_budget
from app.guard import AddressPolicy, IPAddress, URLPolicy, parse_source_url
from tests.upstream import Blackhole

LOOPBACK_ONLY = (ipaddress.ip_network("127.0.0.1/32"),)
PHOTO = "photos/waterfall_1800x1200.jpg"


class Connections:
    """Every connect() any socket in this process attempted, by (host, port)."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, int]] = []

    def off_loopback(self) -> list[tuple[str, int]]:
        return [a for a in self.attempts if not ipaddress.ip_address(a[0]).is_loopback]


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> Iterator[Connections]:
    record = Connections()
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address) -> None:  # type: ignore[no-untyped-def]
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host, port = str(address[0]), int(address[1])
            record.attempts.append((host, port))
            if not ipaddress.ip_address(host).is_loopback:
                raise ConnectionRefusedError(f"test harness: refused to connect off loopback to {host}")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield record


class StubResolver:
    """Answers from a table, or from a function of the call number (for rebinding)."""

    def __init__(self, table: dict[str, list[str]] | None = None, answer: Callable[[int], list[str]] | None = None):
        self.table = table or {}
        self.answer = answer
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.calls.append((host, port))
        if self.answer is not None:
            return [ipaddress.ip_address(a) for a in self.answer(len(self.calls))]
        if host not in self.table:
            raise socket.gaierror(f"stub: no such name {host!r}")
        return [ipaddress.ip_address(a) for a in self.table[host]]


def make_fetcher(resolver: StubResolver, allow_networks=LOOPBACK_ONLY) -> Fetcher:
    return Fetcher(
        timeout=3.0,
        max_bytes=32 * 1024 * 1024,
        via_token="image-proxy",
        address_policy=AddressPolicy(allow_networks),
        resolve=resolver,
    )


@pytest.fixture
def fetchers() -> Iterator[list[Fetcher]]:
    made: list[Fetcher] = []
    yield made
    for fetcher in made:
        fetcher.close()


def fetch(fetchers: list[Fetcher], resolver: StubResolver, url: str, **policy):
    fetcher = make_fetcher(resolver, **policy)
    fetchers.append(fetcher)
    return fetcher.fetch_source(parse_source_url(url), URLPolicy())


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (["10.0.0.1"], "10.0.0.1"),
        (["169.254.169.254"], "169.254.169.254"),
        (["fd00::1"], "fd00::1"),
        (["::ffff:192.168.0.1"], "::ffff:c0a8:1"),
        (["93.184.215.14", "192.168.1.10"], "192.168.1.10"),
        (["192.168.1.10", "93.184.215.14"], "192.168.1.10"),
        (["127.0.0.1", "127.0.0.2"], "127.0.0.2"),
    ],
    ids=[
        "rfc1918",
        "metadata",
        "ula",
        "mapped-private",
        "public-then-private",
        "private-then-public",
        "allowed-then-not",
    ],
)
def test_name_resolving_to_any_refused_address_is_refused_before_any_connection(connections, fetchers, answer, reason):
    resolver = StubResolver({"img.test": answer})
    with pytest.raises(SourceNotAllowed, match=reason.replace(".", r"\.")):
        fetch(fetchers, resolver, "http://img.test/a.jpg")
    assert resolver.calls == [("img.test", 80)]
    assert connections.attempts == []


def test_public_address_that_passes_is_exactly_the_address_connected_to(connections, fetchers):
    resolver = StubResolver({"img.test": ["93.184.215.14"]})
    # The harness refuses the connect (nothing leaves the machine); the attempt shows where it went.
    with pytest.raises(UpstreamFailed, match="cannot connect"):
        fetch(fetchers, resolver, "http://img.test/a.jpg")
    assert connections.attempts == [("93.184.215.14", 80)]


def test_public_address_on_a_port_outside_allowed_ports_is_refused_before_connecting(connections, fetchers):
    resolver = StubResolver({"img.test": ["93.184.215.14"]})
    with pytest.raises(SourceNotAllowed, match="port 8080"):
        fetch(fetchers, resolver, "http://img.test:8080/a.jpg")
    assert connections.attempts == []


def test_made_up_name_on_an_allowed_network_is_fetched_with_its_own_host_header(
    connections, fetchers, upstream, corpus
):
    resolver = StubResolver({"img.test": ["127.0.0.1"]})
    source = fetch(fetchers, resolver, f"http://img.test:{upstream.port}/{PHOTO}")
    assert source.body == (corpus / PHOTO).read_bytes()
    assert connections.attempts == [("127.0.0.1", upstream.port)]
    seen = upstream.headers_seen[-1]
    assert seen["Host"] == f"img.test:{upstream.port}"
    assert seen["Via"] == "1.1 image-proxy"


def test_one_lookup_decides_and_the_connect_uses_that_same_answer(connections, fetchers, upstream, corpus):
    # A rebinding resolver: the first answer passes, every later one points elsewhere. The
    # dialer must not look up again between the check and the connect.
    resolver = StubResolver(answer=lambda call: ["127.0.0.1"] if call == 1 else ["127.0.0.2"])
    source = fetch(fetchers, resolver, f"http://img.test:{upstream.port}/{PHOTO}")
    assert source.body == (corpus / PHOTO).read_bytes()
    assert len(resolver.calls) == 1
    assert connections.attempts == [("127.0.0.1", upstream.port)]


def test_a_new_connection_after_rebinding_is_checked_again_and_refused(connections, fetchers, upstream):
    resolver = StubResolver(answer=lambda call: ["127.0.0.1"] if call == 1 else ["127.0.0.2"])
    fetcher = make_fetcher(resolver)
    fetchers.append(fetcher)
    url = parse_source_url(f"http://img.test:{upstream.port}/{PHOTO}")
    fetcher.fetch_source(url, URLPolicy())
    # Drop the pooled keep-alive connection, so the next fetch dials (and resolves) anew.
    fetcher.session.get_adapter("http://").poolmanager.clear()
    with pytest.raises(SourceNotAllowed, match=r"127\.0\.0\.2"):
        fetcher.fetch_source(url, URLPolicy())
    assert len(resolver.calls) == 2
    assert connections.attempts == [("127.0.0.1", upstream.port)]


def test_literal_addresses_are_never_handed_to_the_resolver(connections, fetchers, upstream):
    resolver = StubResolver(answer=lambda call: ["127.0.0.1"])
    with pytest.raises(SourceNotAllowed, match=r"127\.0\.0\.2"):
        fetch(fetchers, resolver, f"http://127.0.0.2:{upstream.port}/{PHOTO}")
    fetch(fetchers, resolver, f"http://127.0.0.1:{upstream.port}/{PHOTO}")
    assert resolver.calls == []
    assert connections.attempts == [("127.0.0.1", upstream.port)]


def test_redirect_to_a_name_resolving_privately_is_refused_before_connecting_there(connections, fetchers, upstream):
    resolver = StubResolver({"inner.test": ["10.0.0.7"]})
    target = quote("http://inner.test/secret.png", safe="")
    with pytest.raises(SourceNotAllowed, match=r"10\.0\.0\.7"):
        fetch(fetchers, resolver, f"http://127.0.0.1:{upstream.port}/to?url={target}")
    assert connections.off_loopback() == []
    assert upstream.hits["/to"] == 1


@pytest.mark.parametrize(
    ("answer", "message"),
    [(lambda call: [], "cannot resolve"), (None, "cannot resolve")],
    ids=["empty-answer", "nxdomain"],
)
def test_a_name_with_no_address_is_a_502_without_a_connection(connections, fetchers, answer, message):
    resolver = StubResolver({}, answer=answer)
    with pytest.raises(UpstreamFailed, match=message):
        fetch(fetchers, resolver, "http://nowhere.test/a.jpg")
    assert connections.attempts == []


@pytest.mark.parametrize(
    ("current", "location", "refused"),
    [
        ("https://img.test/a.jpg", "http://img.test/b.jpg", "downgrade"),
        ("https://img.test/a.jpg", "http://other.test/b.jpg", "downgrade"),
        ("https://img.test/a.jpg", "https://other.test/b.jpg", None),
        ("http://img.test/a.jpg", "https://img.test/b.jpg", None),
        ("http://img.test/a.jpg", "/b.jpg", None),
        ("http://img.test/a.jpg", "http://user@img.test/b.jpg", "user names"),
        ("http://img.test/a.jpg", "file:///etc/passwd", "refused URL"),
        ("http://img.test/a.jpg", "gopher://img.test/", "refused URL"),
    ],
    ids=[
        "https-to-http",
        "https-to-http-elsewhere",
        "https-to-https",
        "upgrade",
        "relative",
        "userinfo",
        "file",
        "gopher",
    ],
)
def test_redirect_targets_are_checked_like_the_first_url(fetchers, current, location, refused):
    fetcher = make_fetcher(StubResolver())
    fetchers.append(fetcher)
    if refused is None:
        target = fetcher._next_hop(parse_source_url(current), location, URLPolicy())
        assert target.host in ("img.test", "other.test")
    else:
        with pytest.raises(SourceNotAllowed, match=refused):
            fetcher._next_hop(parse_source_url(current), location, URLPolicy())


def test_redirect_back_at_this_service_is_a_loop(fetchers):
    fetcher = make_fetcher(StubResolver())
    fetchers.append(fetcher)
    policy = URLPolicy(self_origins=frozenset({"127.0.0.1:8000"}))
    with pytest.raises(LoopDetected):
        fetcher._next_hop(parse_source_url("http://img.test/a.jpg"), "http://127.1:8000/image?url=x", policy)


# -- each resolved address tried in turn, within the one deadline ---------------------------

LOOPBACK_8 = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.fixture
def blackholes(upstream) -> Iterator[Callable[[str], Blackhole]]:
    made: list[Blackhole] = []

    def make(host: str) -> Blackhole:
        made.append(Blackhole(host, upstream.port))
        return made[-1]

    yield make
    for hole in made:
        hole.close()


@pytest.mark.parametrize(
    ("remaining", "left", "budget"),
    [
        (20.0, 1, 20.0),
        (20.0, 2, ATTEMPT_CAP),
        (4.0, 2, 2.0),
        (2.0, 8, ATTEMPT_FLOOR),
        (0.3, 2, 0.3),
        (0.3, 1, 0.3),
    ],
    ids=["last-gets-all", "capped", "fair-share", "floor", "never-past-deadline", "last-with-little-left"],
)
def test_each_connect_attempt_gets_a_bounded_share_of_the_time_left(remaining, left, budget):
    assert attempt_budget(remaining, left) == pytest.approx(budget)


def test_a_blackholed_first_address_falls_through_to_the_next_within_the_deadline(
    connections, fetchers, upstream, corpus, blackholes
):
    blackholes("127.0.0.3")
    connections.attempts.clear()
    resolver = StubResolver({"dual.test": ["127.0.0.3", "127.0.0.1"]})
    source = fetch(fetchers, resolver, f"http://dual.test:{upstream.port}/{PHOTO}", allow_networks=LOOPBACK_8)
    assert source.body == (corpus / PHOTO).read_bytes()
    assert connections.attempts == [("127.0.0.3", upstream.port), ("127.0.0.1", upstream.port)]
    print(f"fetched in {source.fetch_seconds:.2f} s of the 3 s deadline via the second address")


@pytest.mark.parametrize("dead", ["127.0.0.2", "::1"], ids=["refused-v4", "refused-v6-first"])
def test_a_refusing_first_address_falls_through_to_the_next(connections, fetchers, upstream, corpus, dead):
    resolver = StubResolver({"dual.test": [dead, "127.0.0.1"]})
    source = fetch(fetchers, resolver, f"http://dual.test:{upstream.port}/{PHOTO}", allow_networks=LOOPBACK_8)
    assert source.body == (corpus / PHOTO).read_bytes()
    assert connections.attempts == [(dead, upstream.port), ("127.0.0.1", upstream.port)]


def test_when_every_address_hangs_each_is_tried_and_the_answer_is_a_timeout(
    connections, fetchers, upstream, blackholes
):
    blackholes("127.0.0.3")
    blackholes("127.0.0.4")
    connections.attempts.clear()
    resolver = StubResolver({"dual.test": ["127.0.0.3", "127.0.0.4"]})
    with pytest.raises(UpstreamTimeout):
        fetch(fetchers, resolver, f"http://dual.test:{upstream.port}/{PHOTO}", allow_networks=LOOPBACK_8)
    assert connections.attempts == [("127.0.0.3", upstream.port), ("127.0.0.4", upstream.port)]


def test_a_hanging_address_then_a_refusing_one_is_a_502_not_a_timeout(connections, fetchers, upstream, blackholes):
    blackholes("127.0.0.3")
    connections.attempts.clear()
    resolver = StubResolver({"dual.test": ["127.0.0.3", "127.0.0.2"]})
    with pytest.raises(UpstreamFailed, match="cannot connect"):
        fetch(fetchers, resolver, f"http://dual.test:{upstream.port}/{PHOTO}", allow_networks=LOOPBACK_8)
    assert connections.attempts == [("127.0.0.3", upstream.port), ("127.0.0.2", upstream.port)]
