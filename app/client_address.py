"""client_address(peer, forwarded_for, trusted): the address to log for a request, pure.

X-Forwarded-For is believed only as far as it was written by a proxy we trust: start at
the TCP peer, and while the current hop is a trusted proxy (IMAGE_PROXY_TRUSTED_PROXIES;
default 127.0.0.1/32 and ::1/128, nginx on the same VM), step one entry left in the header.
The first hop that is not a trusted proxy is the client, so a client cannot choose its
logged address by sending its own X-Forwarded-For (it can only add entries to the left of
the one nginx appends). nginx's `real_ip_recursive on` walks the same way.

A unix-socket peer (gunicorn bound to unix:/path, REMOTE_ADDR empty) counts as trusted:
only local processes allowed by the socket file's mode can connect.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=1024)
def _parse(text: str) -> Address | None:
    # Cached: every request parses its peer (a handful of proxies and clients recur); the
    # cache is bounded, and addresses are immutable.
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [2001:db8::1]:443 or [2001:db8::1]
        text = text[1 : text.index("]")]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, trusted: Iterable[Network]) -> bool:
    return any(address.version == network.version and address in network for network in trusted)


def client_address(peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]) -> str:
    """The client's address: the peer, or an X-Forwarded-For entry vouched for by trusted proxies.

    >>> nets = (ipaddress.ip_network("127.0.0.1/32"),)
    >>> client_address("127.0.0.1", "203.0.113.7", nets)
    '203.0.113.7'
    >>> client_address("198.51.100.2", "203.0.113.7", nets)   # peer is no proxy of ours
    '198.51.100.2'
    >>> client_address("127.0.0.1", "6.6.6.6, 203.0.113.7", nets)  # 6.6.6.6 was sent by the client
    '203.0.113.7'
    """
    current = _parse(peer or "")
    if current is None and (peer or "").strip():
        return "unknown"  # neither an IP nor a unix socket: log nothing the peer could shape
    hops = [hop for hop in (forwarded_for or "").split(",") if hop.strip()]
    while current is None or _trusted(current, trusted):
        if not hops:
            break
        previous = _parse(hops.pop())
        if previous is None:
            break  # a malformed entry: the last hop that could be parsed is what we know
        current = previous
    return str(current) if current is not None else "unix"
