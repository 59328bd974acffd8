"""Which gunicorn listener a request came in on, and whether its peer is local: the two facts
that keep /metrics private (IMAGE_PROXY_METRICS_BIND, else loopback peers only)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any


def arrived_on(environ: Mapping[str, Any], bind: str) -> bool:
    """True when the request's socket is the listener `bind` (HOST:PORT or unix:/path).

    gunicorn puts the accepted socket in the environ; its local address is the listener's
    (for TCP, the port identifies it: a host of 0.0.0.0 accepts on any local address).
    Nothing the client sends (Host header, URL) takes part. No gunicorn socket (the Flask
    test client, another server): False.
    """
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        local = sock.getsockname()
    except OSError:
        return False
    if bind.startswith("unix:"):
        return local == bind[len("unix:") :]
    return isinstance(local, tuple) and str(local[1]) == bind.rsplit(":", 1)[1]


def is_loopback_peer(remote_addr: str | None) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped), or a unix socket (gunicorn leaves REMOTE_ADDR empty)."""
    if not remote_addr:
        return True
    try:
        address = ipaddress.ip_address(remote_addr)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback
