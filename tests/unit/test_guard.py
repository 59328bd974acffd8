"""The address and URL policy as pure functions: no socket, no DNS (a stub resolver stands in).

Two tables: addresses (what `is_public` / `AddressPolicy` decide for an IP), and URL spellings
(what the whole pre-connect decision is: parse, URL policy, resolve, every address checked).
The second table's rule is that a spelling gets the decision of the address it denotes.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from app.errors import BadParameter, LoopDetected, ProxyError, SourceNotAllowed
from app.guard import (
    AddressPolicy,
    IPAddress,
    URLPolicy,
    canonical,
    host_matches,
    in_networks,
    is_allowed_address,
    is_public,
    literal_address,
    parse_ipv4_legacy,
    parse_source_url,
)

ALLOW = "allow"
NO_ADDRESS = "no address"

# Made-up names (the .test TLD is reserved, RFC 6761) and what the stub resolver says of them.
STUB_DNS: dict[str, list[str]] = {
    "public.test": ["93.184.215.14"],
    "public6.test": ["2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
    "private.test": ["10.1.2.3"],
    "metadata.test": ["169.254.169.254"],
    "mixed.test": ["93.184.215.14", "192.168.1.10"],
    "mixed6.test": ["2606:2800:21f:cb07:6820:80da:af6b:8b2c", "fd00::1"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "translated.test": ["::ffff:0:10.0.0.1"],
    "localhost": ["127.0.0.1", "::1"],
    "good": ["93.184.215.14"],
    "evil": ["10.0.0.1"],
    "img.example.com": ["93.184.215.14"],
    "a.cdn.example.org": ["93.184.215.14"],
    "b.cdn.example.org": ["10.9.9.9"],
    "cdn.example.org": ["93.184.215.14"],
}


def stub_resolve(host: str, port: int) -> list[IPAddress]:
    if host not in STUB_DNS:
        raise socket.gaierror(f"stub resolver: no such name {host!r}")
    return [ipaddress.ip_address(a) for a in STUB_DNS[host]]


def decide(
    url_text: str,
    *,
    address_policy: AddressPolicy | None = None,
    url_policy: URLPolicy | None = None,
) -> str:
    """The whole decision taken before a connection opens, as `fetch.py` takes it: parse and
    normalize, the URL policy, then every address the host denotes or resolves to."""
    address_policy = address_policy or AddressPolicy()
    try:
        url = parse_source_url(url_text)
        (url_policy or URLPolicy()).check(url)
        literal = literal_address(url.host)
        addresses = [literal] if literal is not None else stub_resolve(url.hostname, url.port)
        for ip in addresses:
            address_policy.check(ip, url.port, url.hostname)
    except ProxyError as exc:
        return type(exc).__name__
    return ALLOW


def net(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# -- addresses ----------------------------------------------------------------------------

#: (address, is it public?)
ADDRESSES: list[tuple[str, bool, str]] = [
    # loopback
    ("127.0.0.1", False, "loopback"),
    ("127.0.0.2", False, "loopback-127.0.0.2"),
    ("127.255.255.254", False, "loopback-top"),
    ("::1", False, "loopback-v6"),
    # RFC 1918
    ("10.0.0.1", False, "rfc1918-10"),
    ("10.255.255.255", False, "rfc1918-10-top"),
    ("172.16.0.1", False, "rfc1918-172.16"),
    ("172.31.255.254", False, "rfc1918-172.31"),
    ("192.168.0.1", False, "rfc1918-192.168"),
    ("192.168.255.255", False, "rfc1918-192.168-top"),
    # link-local and metadata
    ("169.254.169.254", False, "cloud-metadata"),
    ("169.254.0.1", False, "link-local-v4"),
    ("fe80::1", False, "link-local-v6"),
    ("febf:ffff::1", False, "link-local-v6-top"),
    ("fd00:ec2::254", False, "aws-metadata-v6"),
    # CGNAT
    ("100.64.0.1", False, "cgnat-bottom"),
    ("100.127.255.254", False, "cgnat-top"),
    # unique local
    ("fc00::1", False, "unique-local-fc"),
    ("fd12:3456:789a::1", False, "unique-local-fd"),
    ("fec0::1", False, "site-local-deprecated"),
    # multicast and broadcast
    ("224.0.0.1", False, "multicast-v4"),
    ("239.255.255.250", False, "multicast-ssdp"),
    ("ff02::1", False, "multicast-v6"),
    ("ff0e::1", False, "multicast-v6-global-scope"),
    ("255.255.255.255", False, "broadcast"),
    # unspecified and "this network"
    ("0.0.0.0", False, "unspecified-v4"),
    ("0.1.2.3", False, "this-network"),
    ("::", False, "unspecified-v6"),
    # reserved, benchmark, documentation
    ("192.0.0.1", False, "ietf-protocol-assignments"),
    ("192.0.2.1", False, "test-net-1"),
    ("198.51.100.7", False, "test-net-2"),
    ("203.0.113.9", False, "test-net-3"),
    ("198.18.0.1", False, "benchmark-198.18"),
    ("198.19.255.254", False, "benchmark-198.19"),
    ("192.88.99.1", False, "6to4-relay-anycast"),
    ("240.0.0.1", False, "reserved-240"),
    ("2001:db8::1", False, "documentation-v6"),
    ("3fff::1", False, "documentation-v6-3fff"),
    ("100::1", False, "discard-only-v6"),
    ("2001::1", False, "teredo"),
    ("2001:10::1", False, "orchid"),
    # IPv6 forms of IPv4
    ("::ffff:127.0.0.1", False, "mapped-loopback"),
    ("::ffff:7f00:1", False, "mapped-loopback-hex"),
    ("::ffff:10.0.0.1", False, "mapped-rfc1918"),
    ("::ffff:169.254.169.254", False, "mapped-metadata"),
    ("::127.0.0.1", False, "compatible-loopback"),
    ("::10.0.0.1", False, "compatible-rfc1918"),
    ("64:ff9b::7f00:1", False, "nat64-loopback"),
    ("64:ff9b::a00:1", False, "nat64-rfc1918"),
    ("64:ff9b::a9fe:a9fe", False, "nat64-metadata"),
    ("64:ff9b:1::a00:1", False, "nat64-local-use"),
    ("::ffff:0:127.0.0.1", False, "translated-loopback"),
    ("::ffff:0:7f00:1", False, "translated-loopback-hex"),
    ("0:0:0:0:ffff:0:a00:1", False, "translated-rfc1918-long"),
    ("::ffff:0:169.254.169.254", False, "translated-metadata"),
    ("::ffff:0:100.64.0.1", False, "translated-cgnat"),
    ("::ffff:0:0.0.0.0", False, "translated-unspecified"),
    ("2002:7f00:1::", False, "6to4-loopback"),
    ("2002:a00:1::1", False, "6to4-rfc1918"),
    ("2002:c0a8:101::1", False, "6to4-192.168"),
    # public: must pass
    ("8.8.8.8", True, "public-v4-dns"),
    ("1.1.1.1", True, "public-v4-cloudflare"),
    ("93.184.215.14", True, "public-v4"),
    ("100.63.255.255", True, "public-just-below-cgnat"),
    ("100.128.0.0", True, "public-just-above-cgnat"),
    ("172.15.255.255", True, "public-just-below-172.16"),
    ("172.32.0.0", True, "public-just-above-172.31"),
    ("192.167.255.255", True, "public-just-below-192.168"),
    ("223.255.255.254", True, "public-just-below-multicast"),
    ("2606:4700:4700::1111", True, "public-v6"),
    ("2001:4860:4860::8888", True, "public-v6-google"),
    ("::ffff:8.8.8.8", True, "mapped-public"),
    ("64:ff9b::808:808", True, "nat64-public"),
    ("2002:808:808::1", True, "6to4-public"),
    ("::ffff:0:8.8.8.8", True, "translated-public"),
]


@pytest.mark.parametrize(("address", "public"), [a[:2] for a in ADDRESSES], ids=[a[2] for a in ADDRESSES])
def test_address_is_public_only_when_reachable_from_the_internet(address, public):
    ip = ipaddress.ip_address(address)
    assert is_public(ip) is public
    assert is_allowed_address(ip) is public


@pytest.mark.parametrize(("address", "public"), [a[:2] for a in ADDRESSES], ids=[a[2] for a in ADDRESSES])
def test_address_policy_refuses_non_public_addresses_by_default(address, public):
    ip = ipaddress.ip_address(address)
    if public:
        AddressPolicy().check(ip, 443, "h")
    else:
        with pytest.raises(SourceNotAllowed, match="not a public address"):
            AddressPolicy().check(ip, 443, "h")


def test_the_address_tables_are_large_enough():
    assert len(ADDRESSES) >= 60
    assert len(URL_CASES) >= 40


@pytest.mark.parametrize(
    ("mapped", "inner"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("64:ff9b::a00:1", "10.0.0.1"),
        ("::ffff:0:a00:1", "10.0.0.1"),
        ("2002:c0a8:101::1", "192.168.1.1"),
        ("2001:db8::1", "2001:db8::1"),
    ],
    ids=["mapped", "nat64", "translated", "6to4", "plain-v6-stays"],
)
def test_ipv6_forms_of_ipv4_collapse_to_the_ipv4_address(mapped, inner):
    assert canonical(ipaddress.ip_address(mapped)) == ipaddress.ip_address(inner)


# -- ALLOW_NETWORKS -----------------------------------------------------------------------

ALLOW_NETWORK_CASES = [
    ("127.0.0.1", ("127.0.0.1/32",), True, "exact-loopback"),
    ("127.0.0.2", ("127.0.0.1/32",), False, "neighbour-of-exact"),
    ("::ffff:127.0.0.1", ("127.0.0.1/32",), True, "mapped-matches-v4-range"),
    ("64:ff9b::7f00:1", ("127.0.0.1/32",), True, "nat64-matches-v4-range"),
    ("::1", ("127.0.0.1/32",), False, "v6-loopback-is-not-v4-range"),
    ("10.20.30.40", ("10.0.0.0/8",), True, "internal-range"),
    ("11.0.0.1", ("10.0.0.0/8",), True, "public-outside-range-still-public"),
    ("172.16.0.1", ("10.0.0.0/8",), False, "other-private-range"),
    ("169.254.169.254", ("10.0.0.0/8",), False, "metadata-not-opened-by-10/8"),
    ("fd00::5", ("fd00::/8",), True, "v6-internal-range"),
    ("fe80::1", ("fd00::/8",), False, "link-local-not-opened-by-fd00"),
]


@pytest.mark.parametrize(
    ("address", "cidrs", "allowed"),
    [c[:3] for c in ALLOW_NETWORK_CASES],
    ids=[c[3] for c in ALLOW_NETWORK_CASES],
)
def test_allow_networks_exempt_exactly_their_ranges(address, cidrs, allowed):
    assert is_allowed_address(ipaddress.ip_address(address), net(*cidrs)) is allowed


def test_mapped_form_matches_an_ipv4_allow_network_and_its_own_v6_form():
    mapped = ipaddress.ip_address("::ffff:127.0.0.1")
    assert in_networks(mapped, net("127.0.0.1/32"))
    assert in_networks(mapped, net("::ffff:127.0.0.1/128"))
    assert not in_networks(mapped, net("127.0.0.2/32"))


# -- ports --------------------------------------------------------------------------------

PORT_CASES = [
    ("93.184.215.14", 80, (), None, True, "public-80"),
    ("93.184.215.14", 443, (), None, True, "public-443"),
    ("93.184.215.14", 8080, (), None, False, "public-8080"),
    ("93.184.215.14", 22, (), None, False, "public-ssh"),
    ("93.184.215.14", 6379, (), None, False, "public-redis"),
    ("93.184.215.14", 8443, (), (80, 443, 8443), True, "public-8443-when-configured"),
    ("93.184.215.14", 80, (), (443,), False, "public-80-when-only-443"),
    ("10.0.0.5", 8081, ("10.0.0.0/8",), None, True, "allowed-network-any-port"),
    ("10.0.0.5", 6379, ("10.0.0.0/8",), None, True, "allowed-network-redis-port"),
    ("10.0.0.5", 80, (), None, False, "private-80-still-refused"),
]


@pytest.mark.parametrize(
    ("address", "port", "cidrs", "ports", "allowed"),
    [c[:5] for c in PORT_CASES],
    ids=[c[5] for c in PORT_CASES],
)
def test_public_addresses_only_on_allowed_ports_and_allowed_networks_on_any(address, port, cidrs, ports, allowed):
    policy = AddressPolicy(net(*cidrs), ports or (80, 443))
    ip = ipaddress.ip_address(address)
    if allowed:
        policy.check(ip, port, "h")
    else:
        with pytest.raises(SourceNotAllowed):
            policy.check(ip, port, "h")


def test_port_refusal_names_the_port_and_the_allowed_list():
    with pytest.raises(SourceNotAllowed, match=r"port 8080 .*allowed: 80, 443"):
        AddressPolicy().check(ipaddress.ip_address("93.184.215.14"), 8080, "public.test")


# -- legacy IPv4 spellings ----------------------------------------------------------------

LEGACY = [
    ("127.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("0X7F000001".lower(), "127.0.0.1"),
    ("017700000001", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"),
    ("0", "0.0.0.0"),
    ("10.1", "10.0.0.1"),
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
    ("3232235777", "192.168.1.1"),
]


@pytest.mark.parametrize(("spelling", "address"), LEGACY, ids=[s for s, _ in LEGACY])
def test_inet_aton_spellings_read_as_the_address_libc_would_connect_to(spelling, address):
    assert parse_ipv4_legacy(spelling) == ipaddress.IPv4Address(address)
    # and the C library agrees, so the guard reads them as a connect() would
    assert socket.inet_aton(spelling) == ipaddress.IPv4Address(address).packed


@pytest.mark.parametrize("text", ["example.com", "1.2.3.4.5", "256.0.0.1", "0x", "09", "1..2", ""], ids=repr)
def test_non_numeric_or_out_of_range_hosts_are_not_legacy_ipv4(text):
    assert parse_ipv4_legacy(text) is None


# -- URL spellings: the decision equals the decision for the address denoted --------------

URL_CASES: list[tuple[str, str, str | None, str]] = [
    # (url, expected decision, the canonical URL it must decide like, id)
    ("http://127.0.0.1/", "SourceNotAllowed", None, "loopback-dotted"),
    ("http://127.1/", "SourceNotAllowed", "http://127.0.0.1/", "loopback-short"),
    ("http://2130706433/", "SourceNotAllowed", "http://127.0.0.1/", "loopback-decimal"),
    ("http://0x7f000001/", "SourceNotAllowed", "http://127.0.0.1/", "loopback-hex"),
    ("http://017700000001/", "SourceNotAllowed", "http://127.0.0.1/", "loopback-octal"),
    ("http://0x7f.1/", "SourceNotAllowed", "http://127.0.0.1/", "loopback-hex-short"),
    ("http://0177.0.0.01/", "SourceNotAllowed", "http://127.0.0.1/", "loopback-octal-parts"),
    ("http://127.0.0.1./", "SourceNotAllowed", "http://127.0.0.1/", "loopback-trailing-dot"),
    ("http://[::ffff:127.0.0.1]/", "SourceNotAllowed", "http://127.0.0.1/", "mapped-dotted"),
    ("http://[::ffff:7f00:1]/", "SourceNotAllowed", "http://127.0.0.1/", "mapped-hex"),
    ("http://[0:0:0:0:0:ffff:7f00:1]/", "SourceNotAllowed", "http://127.0.0.1/", "mapped-long"),
    ("http://[64:ff9b::a9fe:a9fe]/", "SourceNotAllowed", "http://169.254.169.254/", "nat64-metadata"),
    ("http://[::ffff:0:127.0.0.1]/", "SourceNotAllowed", "http://127.0.0.1/", "translated-loopback"),
    ("http://[::ffff:0:a9fe:a9fe]/", "SourceNotAllowed", "http://169.254.169.254/", "translated-metadata"),
    ("http://translated.test/", "SourceNotAllowed", "http://10.0.0.1/", "name-to-translated-rfc1918"),
    ("http://[::ffff:0:5db8:d70e]/", ALLOW, "http://93.184.215.14/", "translated-public"),
    ("http://[::1]/", "SourceNotAllowed", None, "v6-loopback"),
    ("http://[::]/", "SourceNotAllowed", None, "v6-unspecified"),
    ("http://0/", "SourceNotAllowed", "http://0.0.0.0/", "zero"),
    ("http://169.254.169.254/latest/meta-data/", "SourceNotAllowed", None, "metadata"),
    ("http://0xa9fea9fe/", "SourceNotAllowed", "http://169.254.169.254/", "metadata-hex"),
    ("http://2852039166/", "SourceNotAllowed", "http://169.254.169.254/", "metadata-decimal"),
    ("http://10.1/", "SourceNotAllowed", "http://10.0.0.1/", "rfc1918-short"),
    ("http://private.test/", "SourceNotAllowed", "http://10.1.2.3/", "name-to-private"),
    ("http://metadata.test/", "SourceNotAllowed", "http://169.254.169.254/", "name-to-metadata"),
    ("http://mixed.test/", "SourceNotAllowed", "http://192.168.1.10/", "name-to-public-and-private"),
    ("http://mixed6.test/", "SourceNotAllowed", "http://[fd00::1]/", "name-to-public-and-ula"),
    ("http://mapped.test/", "SourceNotAllowed", "http://127.0.0.1/", "name-to-mapped-loopback"),
    ("http://localhost/", "SourceNotAllowed", "http://127.0.0.1/", "localhost"),
    ("http://LOCALHOST./", "SourceNotAllowed", "http://localhost/", "localhost-upper-trailing-dot"),
    ("http://public.test/a.jpg", ALLOW, "http://93.184.215.14/a.jpg", "name-to-public"),
    ("http://PUBLIC.TEST./a.jpg", ALLOW, "http://public.test/a.jpg", "name-upper-trailing-dot"),
    ("https://public6.test/a.jpg", ALLOW, "https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/a.jpg", "name-to-v6"),
    ("http://93.184.215.14/", ALLOW, None, "public-literal"),
    ("http://1572395790/", ALLOW, "http://93.184.215.14/", "public-decimal"),
    ("http://[::ffff:5db8:d70e]/", ALLOW, "http://93.184.215.14/", "public-mapped"),
    ("http://public.test:8080/", "SourceNotAllowed", "http://93.184.215.14:8080/", "public-bad-port"),
    ("http://public.test:443/", ALLOW, None, "public-http-on-443"),
    ("http://public.test:80/", ALLOW, "http://public.test/", "default-port-spelled"),
    # userinfo tricks: refused outright, whatever each side resolves to
    ("http://good@evil/", "SourceNotAllowed", None, "userinfo-user"),
    ("http://good:pw@evil/", "SourceNotAllowed", None, "userinfo-user-password"),
    ("http://evil@good/", "SourceNotAllowed", None, "userinfo-reversed"),
    ("http://public.test@127.0.0.1/", "SourceNotAllowed", None, "userinfo-public-at-loopback"),
    ("http://@public.test/", "SourceNotAllowed", None, "userinfo-empty"),
    # the fragment holds the @: the host is evil, and evil is private
    ("http://evil#@good/", "SourceNotAllowed", "http://evil/", "fragment-at"),
    ("http://evil?@good/", "SourceNotAllowed", "http://evil/", "query-at"),
    ("http://good#@evil/", ALLOW, "http://good/", "fragment-at-public-host"),
    # malformed hosts and ports
    ("http://[fe80::1%25eth0]/", "SourceNotAllowed", None, "zone-id"),
    ("http://[fe80::1%eth0]/", "SourceNotAllowed", None, "zone-id-raw"),
    ("http://public.test:99999/", "BadParameter", None, "port-out-of-range"),
    ("http://public.test:0/", "BadParameter", None, "port-zero"),
    ("http://public.test:-1/", "BadParameter", None, "port-negative"),
    ("http://public.test:8o/", "BadParameter", None, "port-letters"),
    ("http://256.0.0.1/", "BadParameter", None, "ipv4-octet-too-big"),
    ("http://1.2.3.4.5/", "BadParameter", None, "ipv4-five-parts"),
    ("http://%31%32%37.0.0.1/", "BadParameter", None, "percent-encoded-host"),
    ("http://127.0.0.1\\@public.test/", "BadParameter", None, "backslash"),
    ("http://[127.0.0.1]/", "BadParameter", None, "v4-in-brackets"),
    ("http:///a.jpg", "BadParameter", None, "no-host"),
    ("//public.test/a.jpg", "BadParameter", None, "scheme-relative"),
    ("file:///etc/passwd", "BadParameter", None, "file-scheme"),
    ("gopher://public.test/", "SourceNotAllowed", None, "gopher-scheme"),
    ("ftp://public.test/a.jpg", "SourceNotAllowed", None, "ftp-scheme"),
    ("http://unknown.test/", NO_ADDRESS, None, "does-not-resolve"),
]


def _decide_or_dns_failure(url: str) -> str:
    try:
        return decide(url)
    except socket.gaierror:
        return NO_ADDRESS  # the fetcher answers 502 (DNS failure): nothing to connect to


@pytest.mark.parametrize(
    ("url", "expected", "same_as"),
    [c[:3] for c in URL_CASES],
    ids=[c[3] for c in URL_CASES],
)
def test_each_url_spelling_gets_the_decision_of_the_address_it_denotes(url, expected, same_as):
    decision = _decide_or_dns_failure(url)
    assert decision == expected
    if same_as is not None:
        assert decision == _decide_or_dns_failure(same_as)


@pytest.mark.parametrize(
    ("spelling", "normal"),
    [
        ("http://127.1/", "http://127.0.0.1/"),
        ("http://0x7f.1:8080/a?b", "http://127.0.0.1:8080/a?b"),
        ("HTTP://Public.TEST.:80/A.jpg#frag", "http://public.test/A.jpg"),
        ("https://public.test:443/", "https://public.test/"),
        ("http://[0:0::1]:81/", "http://[::1]:81/"),
        ("http://пример.рф/a.jpg", "http://xn--e1afmkfd.xn--p1ai/a.jpg"),
    ],
    ids=["short-ipv4", "hex-with-port", "case-dot-port-fragment", "https-default-port", "v6-compress", "idna"],
)
def test_urls_normalize_to_the_form_that_is_fetched_and_cached(spelling, normal):
    assert str(parse_source_url(spelling)) == normal


def test_userinfo_refusal_says_why():
    with pytest.raises(SourceNotAllowed, match="user names and passwords"):
        parse_source_url("http://good@evil/")


def test_overlong_url_is_a_bad_parameter():
    with pytest.raises(BadParameter, match="2048"):
        parse_source_url("http://public.test/" + "a" * 2048)


# -- ALLOWED_HOSTS ------------------------------------------------------------------------

HOST_PATTERNS = ("img.example.com", "*.cdn.example.org")
ALLOWED_HOST_CASES = [
    ("https://img.example.com/a.jpg", ALLOW, "exact"),
    ("https://IMG.Example.COM./a.jpg", ALLOW, "exact-case-and-dot"),
    ("https://a.cdn.example.org/a.jpg", ALLOW, "subdomain"),
    ("https://b.cdn.example.org/a.jpg", "SourceNotAllowed", "listed-subdomain-with-private-address"),
    ("https://cdn.example.org/a.jpg", "SourceNotAllowed", "pattern-does-not-match-apex"),
    ("https://www.img.example.com/", "SourceNotAllowed", "exact-does-not-match-subdomain"),
    ("https://evilcdn.example.org/", "SourceNotAllowed", "suffix-without-dot"),
    ("https://img.example.com.evil.test/", "SourceNotAllowed", "exact-as-prefix"),
    ("https://public.test/", "SourceNotAllowed", "unlisted-public"),
    ("https://img.example.com@public.test/", "SourceNotAllowed", "listed-name-as-userinfo"),
    ("https://93.184.215.14/", "SourceNotAllowed", "listed-name-by-address"),
]


@pytest.mark.parametrize(
    ("url", "expected"), [c[:2] for c in ALLOWED_HOST_CASES], ids=[c[2] for c in ALLOWED_HOST_CASES]
)
def test_allowed_hosts_limit_sources_to_exact_names_and_star_patterns(url, expected):
    # b.cdn.example.org shows the host list adds to the address check and does not replace it
    assert decide(url, url_policy=URLPolicy(allowed_hosts=HOST_PATTERNS)) == expected


@pytest.mark.parametrize(
    ("host", "matches"),
    [
        ("a.cdn.example.org", True),
        ("a.b.cdn.example.org", True),
        ("cdn.example.org", False),
        ("xcdn.example.org", False),
        ("img.example.com", True),
        ("img.example.co", False),
    ],
    ids=["one-level", "two-levels", "apex", "glued-suffix", "exact", "shorter"],
)
def test_host_patterns_match_subdomains_but_not_the_apex(host, matches):
    assert host_matches(host, HOST_PATTERNS) is matches


def test_allowed_hosts_message_names_the_setting():
    with pytest.raises(SourceNotAllowed, match="IMAGE_PROXY_ALLOWED_HOSTS"):
        URLPolicy(allowed_hosts=HOST_PATTERNS).check(parse_source_url("https://public.test/"))


# -- ALLOW_NETWORKS through the whole decision ---------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8081/a.png", ALLOW),
        ("http://2130706433:8081/a.png", ALLOW),
        ("http://[::ffff:127.0.0.1]:8081/a.png", ALLOW),
        ("http://127.0.0.2:8081/a.png", "SourceNotAllowed"),
        ("http://[::1]:8081/a.png", "SourceNotAllowed"),
        ("http://localhost:8081/a.png", "SourceNotAllowed"),  # also resolves to ::1
        ("http://mapped.test:8081/a.png", ALLOW),
    ],
    ids=["dotted", "decimal", "mapped", "neighbour", "v6-loopback", "localhost-dual-stack", "name-to-mapped"],
)
def test_allow_network_opens_one_address_on_any_port_and_nothing_else(url, expected):
    policy = AddressPolicy(net("127.0.0.1/32"))
    assert decide(url, address_policy=policy) == expected


# -- loops ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000/image?url=x", "http://127.1:8000/", "http://2130706433:8000/", "HTTP://127.0.0.1.:8000/"],
    ids=["dotted", "short", "decimal", "upper-trailing-dot"],
)
def test_url_pointing_at_this_service_is_a_loop_in_any_spelling(url):
    policy = URLPolicy(self_origins=frozenset({"127.0.0.1:8000"}))
    with pytest.raises(LoopDetected):
        policy.check(parse_source_url(url))


def test_same_host_on_another_port_is_not_a_loop():
    URLPolicy(self_origins=frozenset({"127.0.0.1:8000"})).check(parse_source_url("http://127.0.0.1:8001/"))
