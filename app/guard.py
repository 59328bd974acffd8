"""Address and URL policy for upstream fetches. Pure: no sockets, no DNS.

`fetch.py` asks `check_address` about every address a host resolves to, inside the
connection's dialer, so the address that was checked is the one connected to.
`check_url` holds the rules that need no resolution (scheme, credentials, host list, port
syntax, loops) and runs on the request URL and on every redirect hop.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from app.errors import BadParameter, LoopDetected, SourceNotAllowed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Ranges never reachable from the public internet, or that alias something that is not.
# Python's is_global covers most; these are listed so the policy reads in one place and
# does not change with the Python version.
_BLOCKED: tuple[Network, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "0.0.0.0/8",  # "this network", unspecified
        "10.0.0.0/8",  # RFC 1918
        "100.64.0.0/10",  # CGNAT shared space
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
        "172.16.0.0/12",  # RFC 1918
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # TEST-NET-1
        "192.88.99.0/24",  # deprecated 6to4 relay anycast
        "192.168.0.0/16",  # RFC 1918
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # TEST-NET-2
        "203.0.113.0/24",  # TEST-NET-3
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, broadcast
        "::/128",  # unspecified
        "::1/128",  # loopback
        "::/96",  # IPv4-compatible (deprecated) and other low forms
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments (Teredo, ORCHID, ...)
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
        "5f00::/16",  # segment routing SIDs
        "64:ff9b:1::/48",  # local-use NAT64
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # deprecated site-local
        "ff00::/8",  # multicast
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# SIIT's IPv4-translated form ::ffff:0:a.b.c.d (RFC 2765, kept in RFC 6052's family): a
# translator on the path delivers it to a.b.c.d, and Python's is_global calls the whole
# prefix global, so without this line ::ffff:0:127.0.0.1 would pass as public.
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_6TO4 = ipaddress.ip_network("2002::/16")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form stands for (mapped, translated, NAT64, 6to4), or None."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64 or ip in _TRANSLATED:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    return None


def canonical(ip: IPAddress) -> IPAddress:
    """The address a connection really reaches: IPv6 forms of IPv4 collapse to IPv4."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            return inner
    return ip


def is_public(ip: IPAddress) -> bool:
    ip = canonical(ip)
    if any(ip in net for net in _BLOCKED if net.version == ip.version):
        return False
    return ip.is_global and not ip.is_multicast


def is_allowed_address(ip: IPAddress, allow_networks: Iterable[Network] = ()) -> bool:
    """True when a connection to `ip` is allowed: a public address, or inside ALLOW_NETWORKS."""
    return in_networks(ip, allow_networks) or is_public(ip)


def in_networks(ip: IPAddress, networks: Iterable[Network]) -> bool:
    forms = {ip, canonical(ip)}
    return any(form in net for net in networks for form in forms if form.version == net.version)


@dataclass(frozen=True)
class AddressPolicy:
    allow_networks: tuple[Network, ...] = ()
    allowed_ports: tuple[int, ...] = (80, 443)

    def check(self, ip: IPAddress, port: int, host: str) -> None:
        """Raise SourceNotAllowed unless connecting to ip:port is allowed."""
        if in_networks(ip, self.allow_networks):
            return
        if not is_public(ip):
            # The address a name resolved to stays in the detail (logged, never sent), so
            # the answer maps no internal DNS.
            raise SourceNotAllowed("the source host's address is not a public address",
                                   detail=f"{host} resolves to {ip}")
        if port not in self.allowed_ports:
            allowed = ", ".join(str(p) for p in self.allowed_ports)
            raise SourceNotAllowed(f"port {port} is not allowed for public addresses (allowed: {allowed})")


_IPV4_PART = re.compile(r"0x[0-9a-f]*|0[0-7]*|[1-9][0-9]*")


def parse_ipv4_legacy(host: str) -> ipaddress.IPv4Address | None:
    """Read the inet_aton spellings browsers and libc accept: 127.1, 2130706433, 0x7f000001,
    017700000001, 0x7f.1. Returns None when the host is not such a number."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_IPV4_PART.fullmatch(p) for p in parts):
        return None
    try:
        numbers = [int(p, 16) if p.startswith("0x") else int(p, 8) if p.startswith("0") else int(p) for p in parts]
    except ValueError:  # "0x" alone
        return None
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        return None
    value = 0
    for n in head:
        value = value * 256 + n
    value = value * 256 ** (5 - len(numbers)) + last
    return ipaddress.IPv4Address(value)


def literal_address(host: str) -> IPAddress | None:
    """The IP address a URL host names literally (in any accepted spelling), else None."""
    if host.startswith("[") and host.endswith("]"):
        try:
            return ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None
    return parse_ipv4_legacy(host)


@dataclass(frozen=True)
class SourceURL:
    """A parsed, normalized source URL: what is fetched and what the cache key holds."""

    scheme: str
    host: str  # lower-case, IDNA-encoded, no trailing dot; IPv6 in brackets
    port: int
    path_and_query: str

    @property
    def origin(self) -> str:
        default = {"http": 80, "https": 443}[self.scheme]
        netloc = self.host if self.port == default else f"{self.host}:{self.port}"
        return f"{self.scheme}://{netloc}"

    def __str__(self) -> str:
        return self.origin + self.path_and_query

    @property
    def hostname(self) -> str:
        """The host as a resolver or TLS wants it: no brackets."""
        return self.host[1:-1] if self.host.startswith("[") else self.host


MAX_URL_LENGTH = 2048
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
_HOST_LABELS = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*")


def parse_source_url(text: str, *, param: str = "url") -> SourceURL:
    """Parse and normalize an absolute http(s) URL, or raise BadParameter/SourceNotAllowed."""
    if len(text) > MAX_URL_LENGTH:
        raise BadParameter(f"{param}: longer than {MAX_URL_LENGTH} characters")
    if _CONTROL_OR_SPACE.search(text) or "\\" in text:
        raise BadParameter(f"{param}: contains spaces, control characters or backslashes")
    try:
        parts: SplitResult = urlsplit(text)
        port = parts.port
    except ValueError:
        raise BadParameter(f"{param}: not a valid URL (its port or [IPv6] brackets do not parse)") from None
    scheme = parts.scheme.lower()
    if not scheme or not parts.netloc:
        raise BadParameter(f"{param}: must be an absolute http or https URL")
    if scheme not in ("http", "https"):
        raise SourceNotAllowed(f"{param}: scheme {scheme!r} is not allowed (only http and https)")
    if "@" in parts.netloc:
        # userinfo makes "http://trusted@evil/" read as trusted; no image source needs it.
        raise SourceNotAllowed(f"{param}: user names and passwords in the URL are not allowed")
    host = _normalize_host(parts.hostname or "", parts.netloc, param)
    if port is None:
        port = 443 if scheme == "https" else 80
    if port == 0:
        raise BadParameter(f"{param}: port 0 is not valid")
    path = remove_dot_segments(normalize_escapes(parts.path or "/", PATH_SAFE))
    query = normalize_escapes(parts.query, QUERY_SAFE)
    return SourceURL(scheme, host, port, path + (f"?{query}" if query else ""))


# RFC 3986 section 2: what may stand unencoded in a path and in a query. They are urllib3's
# PATH_CHARS / QUERY_CHARS, so requests sends a normalized URL byte for byte as it is.
UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
PATH_SAFE = UNRESERVED | frozenset("!$&'()*+,;=:@/")
QUERY_SAFE = PATH_SAFE | {"?"}
_HEX = frozenset("0123456789abcdefABCDEF")


def normalize_escapes(text: str, safe: frozenset[str]) -> str:
    """RFC 3986 section 6.2.2.2: an escaped unreserved character is decoded (%7E -> ~, %41 -> A),
    other escapes are upper-cased (%2f -> %2F, kept: decoding it would change the path);
    a character that may not stand here (non-ASCII as UTF-8, ", <, >, ^, `, {, |, }, [, ])
    is escaped, and so is a % that starts no escape (%zz -> %25zz)."""
    data = text.encode("utf-8")
    out: list[str] = []
    index = 0
    while index < len(data):
        byte = data[index]
        escape = data[index + 1 : index + 3].decode("latin-1")
        if byte == 0x25 and len(escape) == 2 and set(escape) <= _HEX:
            char = chr(int(escape, 16))
            out.append(char if char in UNRESERVED else "%" + escape.upper())
            index += 3
            continue
        char = chr(byte)
        out.append(char if byte < 0x80 and char in safe else f"%{byte:02X}")
        index += 1
    return "".join(out)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 for an absolute path: /a/./b/../c -> /a/c, /../a -> /a. Clients
    (requests included) fetch the path this way, so the cache key must name it this way too."""
    output: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if output:
                output.pop()
        elif segment != ".":
            output.append(segment)
    # A path ending in a dot segment names a directory: it keeps its trailing slash.
    if path.rsplit("/", 1)[-1] in (".", ".."):
        output.append("")
    return "/" + "/".join(output)


def _normalize_host(hostname: str, netloc: str, param: str) -> str:
    if not hostname:
        raise BadParameter(f"{param}: has no host")
    if netloc.rsplit("@", 1)[-1].startswith("["):
        if "%" in hostname:
            raise SourceNotAllowed(f"{param}: IPv6 zone identifiers are not allowed")
        try:
            return f"[{ipaddress.IPv6Address(hostname).compressed}]"
        except ValueError:
            raise BadParameter(f"{param}: {hostname!r} is not a valid IPv6 address") from None
    host = hostname.rstrip(".")
    legacy = parse_ipv4_legacy(host)
    if legacy is not None:
        return str(legacy)
    try:
        host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise BadParameter(f"{param}: host {hostname!r} is not a valid domain name") from None
    if not _HOST_LABELS.fullmatch(host) or len(host) > 253:
        raise BadParameter(f"{param}: host {hostname!r} is not a valid domain name")
    if re.fullmatch(r"[0-9.]+|0x[0-9a-f.x]*", host):
        raise BadParameter(f"{param}: host {hostname!r} is not a valid IPv4 address")
    return host


def host_matches(host: str, patterns: Iterable[str]) -> bool:
    """Exact names, or *.example.com, which matches any subdomain but not example.com itself."""
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


@dataclass(frozen=True)
class URLPolicy:
    allowed_hosts: tuple[str, ...] = ()
    #: "host:port" pairs that are this service itself; fetching them would loop.
    self_origins: frozenset[str] = frozenset()

    def check(self, url: SourceURL) -> None:
        if self.allowed_hosts and not host_matches(url.host, self.allowed_hosts):
            raise SourceNotAllowed(f"host {url.host} is not in IMAGE_PROXY_ALLOWED_HOSTS")
        if f"{url.host}:{url.port}" in self.self_origins:
            raise LoopDetected(f"url points back at this service ({url.host}:{url.port})")
