"""Upstream fetch: the only code that touches the network for source images.

`Fetcher.fetch_source(url, url_policy)` returns a `Source` or raises a typed ProxyError. It
owns the pooled requests.Session, follows redirects by hand (each hop re-checked), holds one
deadline over connect + headers + body, and cuts the body at MAX_SOURCE_BYTES.

The address check lives in the connection's dialer (`_GuardedConnectionMixin._new_conn`):
the host is resolved there, every address checked with the guard, and the socket opened to
the checked address, so DNS cannot change between check and connect. Host header, TLS SNI
and certificate verification still use the host name, because urllib3 keeps `self.host`.

Failures reach the client as fixed reasons (one per kind: cannot resolve, cannot connect or
no HTTP answer, TLS, timeout, status): never the exception's text, which can carry what the
other end sent (an SSH banner read as a status line) or tell a refused port from one that
sent garbage. The detail goes in the error's `detail`, which fetch_source logs
(`image_proxy.fetch`, at INFO) and never sends.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.cookiejar import Cookie, DefaultCookiePolicy
from typing import Any
from urllib.parse import urljoin

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.cookies import RequestsCookieJar
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NameResolutionError, NewConnectionError

from app.errors import (
    Busy,
    LoopDetected,
    ProxyError,
    SourceNotAllowed,
    SourceNotFound,
    SourceTooLarge,
    TooManyRedirects,
    UpstreamFailed,
    UpstreamRefused,
    UpstreamTimeout,
)
from app.guard import AddressPolicy, IPAddress, SourceURL, URLPolicy, parse_source_url

MAX_REDIRECTS = 5
CHUNK = 64 * 1024
HOLD_STEP = 1024 * 1024
_DIGITS = re.compile(r"[0-9]{1,19}")
USER_AGENT = "image-proxy/1.0 (+https://github.com/image-proxy)"

log = logging.getLogger("image_proxy.fetch")

#: The public reasons. UNREACHABLE covers a refused port, a reset, and a listener that
#: answers with something other than HTTP alike, so the answer is no port scanner.
UNREACHABLE = "cannot connect to the upstream, or it did not answer with HTTP"
UNRESOLVED = "cannot resolve the source host"
TLS_FAILED = "the TLS handshake with the upstream failed"
BROKE_OFF = "the upstream body broke off before its end"
REFUSED_REDIRECT = "the upstream redirected to a refused URL"
REDIRECTED_BACK = "the upstream redirected to a URL that points back at this service"

#: host, port -> addresses; the default asks the system resolver. Tests pass a stub.
Resolver = Callable[[str, int], list[IPAddress]]


def system_resolver(host: str, port: int) -> list[IPAddress]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in seen:
            seen.append(ip)
    return seen


@dataclass(frozen=True)
class Validators:
    """The upstream's ETag / Last-Modified of a stored source, sent back to revalidate it."""

    etag: str = ""
    last_modified: str = ""

    def __bool__(self) -> bool:
        return bool(self.etag or self.last_modified)

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers


@dataclass(frozen=True)
class Source:
    """What the upstream sent: the body, the URL it finally came from and its validators.
    `not_modified` is a 304 to a conditional request: no body, the stored one is current."""

    body: bytes
    url: SourceURL
    fetch_seconds: float
    validators: Validators = Validators()
    not_modified: bool = False


class _DeadlinePassed(Exception):
    pass


class _RefuseAllCookies(DefaultCookiePolicy):
    """Neither accept nor return any cookie."""

    def set_ok(self, cookie: Cookie, request: Any) -> bool:
        return False

    def return_ok(self, cookie: Cookie, request: Any) -> bool:
        return False


class _NoCookieJar(RequestsCookieJar):
    """A session jar that never holds a cookie.

    The session is shared by every user's fetches in a worker: a stored Set-Cookie would be
    sent on later fetches for other users (the stdlib jar has no public-suffix list, so
    Domain=.github.io from one site reaches another), and a flood of large cookies would make
    every later request to that domain too large to answer. The policy stops
    extract_cookies; set_cookie is the one sink every other path (update, set, merges)
    goes through, so dropping there leaves nothing to send.
    """

    def __init__(self) -> None:
        super().__init__(policy=_RefuseAllCookies())

    def set_cookie(self, cookie: Cookie, *args: Any, **kwargs: Any) -> None:
        return None


class _GuardedConnectionMixin:
    """Resolve, check every address, and connect to a checked one."""

    policy: AddressPolicy
    resolve: Resolver
    host: str
    port: int
    timeout: Any
    source_address: Any
    socket_options: Any

    def _new_conn(self) -> socket.socket:
        host = self.host.strip("[]")
        try:
            # A literal address is its own answer: a resolver (or a stub in a test) never
            # gets the chance to turn "127.0.0.2" into something else.
            addresses = _literal(host) or self.resolve(host, self.port)
        except (socket.gaierror, UnicodeError) as exc:
            raise NameResolutionError(self.host, self, socket.gaierror(str(exc))) from exc  # type: ignore[arg-type]
        if not addresses:
            raise NameResolutionError(self.host, self, socket.gaierror("no addresses"))  # type: ignore[arg-type]
        # Every address must pass: a name that resolves to one public and one private
        # address would otherwise let the OS pick the private one on a retry.
        for ip in addresses:
            self.policy.check(ip, self.port, host)
        return self._connect_in_turn(addresses, host)

    def _connect_in_turn(self, addresses: list[IPAddress], host: str) -> socket.socket:
        """Try each checked address in order within the one connect deadline.

        A refused address falls through to the next at once; one that does not answer gets
        only its share of the time left (`attempt_budget`), so a dual-stack host whose first
        address is blackholed is still reached on its second, not a 504 after the deadline.
        """
        deadline = time.monotonic() + self.timeout if isinstance(self.timeout, (int, float)) else None
        last_error: OSError | None = None
        for index, ip in enumerate(addresses):
            budget: float | None = None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    last_error = TimeoutError("no time left for the remaining addresses")
                    break
                budget = attempt_budget(remaining, len(addresses) - index)
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                for option in self.socket_options or ():
                    sock.setsockopt(*option)
                sock.settimeout(budget)
                sock.connect((str(ip), self.port))
            except OSError as exc:
                sock.close()
                last_error = exc
                continue
            # Back to the whole connect timeout, as urllib3 would leave it, for the request.
            sock.settimeout(self.timeout if deadline is not None else None)
            return sock
        # Out of time is a 504, as before; every address refusing or unreachable is a 502.
        if isinstance(last_error, TimeoutError):
            raise urllib3.exceptions.ConnectTimeoutError(self, f"connect to {host} timed out")
        raise NewConnectionError(self, f"Failed to establish a new connection: {last_error}")


#: Seconds every connect attempt but the last may take at most, and at least (time left
#: permitting). A healthy path answers a SYN within one round trip, or within ~1 s plus a
#: round trip when the first SYN is lost (Linux's initial retransmit timeout is 1 s), so
#: 3 s is enough for a live address, and a blackholed one (a dead IPv6 route, the common
#: dual-stack failure) costs 3 s, not the whole UPSTREAM_TIMEOUT. RFC 8305 (Happy
#: Eyeballs) races addresses 250 ms apart; trying them in turn is simpler and, with
#: pooled connections, paid once per connection, not per request.
ATTEMPT_CAP = 3.0
ATTEMPT_FLOOR = 0.5


def attempt_budget(remaining: float, addresses_left: int) -> float:
    """Connect time for the next address: the last one gets all that is left; the others a
    fair share of it, between ATTEMPT_FLOOR and ATTEMPT_CAP, never more than is left."""
    if addresses_left <= 1:
        return remaining
    return min(remaining, max(ATTEMPT_FLOOR, min(ATTEMPT_CAP, remaining / addresses_left)))


def _literal(host: str) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        return []


def _adapter(policy: AddressPolicy, resolve: Resolver, pool_size: int) -> HTTPAdapter:
    attrs = {"policy": policy, "resolve": staticmethod(resolve)}
    http_conn = type("GuardedHTTPConnection", (_GuardedConnectionMixin, HTTPConnection), attrs)
    https_conn = type("GuardedHTTPSConnection", (_GuardedConnectionMixin, HTTPSConnection), attrs)
    http_pool = type("GuardedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn})
    https_pool = type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn})

    adapter = HTTPAdapter(pool_connections=16, pool_maxsize=pool_size, max_retries=0)
    adapter.poolmanager.pool_classes_by_scheme = {"http": http_pool, "https": https_pool}
    return adapter


class Fetcher:
    """One per worker process: a pooled session whose every connection is guarded."""

    def __init__(
        self,
        *,
        timeout: float,
        max_bytes: int,
        via_token: str,
        address_policy: AddressPolicy,
        resolve: Resolver = system_resolver,
        pool_size: int = 16,
    ) -> None:
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.session = requests.Session()
        self.session.trust_env = False  # no proxies or netrc from the environment
        self.session.cookies = _NoCookieJar()
        adapter = _adapter(address_policy, resolve, pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.clear()
        self.session.headers.update(
            {
                "User-Agent": USER_AGENT,
                "Accept": "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8",
                # A compressed image body gains nothing, and decoding one is a bomb vector.
                "Accept-Encoding": "identity",
                "Via": f"1.1 {via_token}",
            }
        )

    @property
    def timeout_reason(self) -> str:
        return f"upstream did not deliver the image within {self.timeout:g} s"

    def close(self) -> None:
        self.session.close()

    def fetch_source(
        self, url: SourceURL, url_policy: URLPolicy, *, deadline: float | None = None,
        validators: Validators | None = None, hold_bytes: Callable[[int], None] | None = None,
    ) -> Source:
        """`deadline` (time.monotonic) is the request's own, when it ends before
        UPSTREAM_TIMEOUT would: the fetch never outlives the request budget. With
        `validators`, the request is conditional and a 304 returns `not_modified`.
        `hold_bytes(n)` is told, before the body grows past n bytes, how much memory it
        needs: the service's memory budget admits fetched bodies as they arrive (it may
        raise to refuse)."""
        started = time.monotonic()
        deadline = min(started + self.timeout, deadline or float("inf"))
        conditional = validators.headers() if validators else {}
        try:
            for _hop in range(MAX_REDIRECTS + 1):
                response = self._get(url, deadline, conditional)
                try:
                    found = Validators(response.headers.get("ETag", "")[:200],
                                       response.headers.get("Last-Modified", "")[:100])
                    if response.status_code == 304:
                        return Source(body=b"", url=url, fetch_seconds=time.monotonic() - started,
                                      validators=found if found else (validators or found), not_modified=True)
                    location = _redirect_target(response)
                    if location is None:
                        body = self._read_body(response, deadline, hold_bytes)
                        return Source(body=body, url=url, fetch_seconds=time.monotonic() - started,
                                      validators=found)
                finally:
                    response.close()
                url = self._next_hop(url, location, url_policy)
            raise TooManyRedirects(f"more than {MAX_REDIRECTS} redirects")
        except ProxyError as exc:
            if exc.detail:
                # %r: the detail may hold what the other end sent, control characters too.
                log.info("fetch %s failed: %s: %r", url.origin, exc.message, exc.detail)
            raise
        except _DeadlinePassed:
            if deadline < started + self.timeout:
                # The request's own budget ran out first (it waited for a lock, memory or a
                # slot): that says nothing about the upstream, so a 503 that is not stored
                # and does not mark the source as failing.
                raise Busy("this request ran out of time before the image arrived; retry shortly",
                           retry_after=2) from None
            raise UpstreamTimeout(self.timeout_reason) from None

    def _next_hop(self, current: SourceURL, location: str, url_policy: URLPolicy) -> SourceURL:
        # Location is upstream bytes: its parse errors and the host it names stay in the log.
        try:
            target = parse_source_url(urljoin(str(current), location), param="redirect")
        except ProxyError as exc:
            raise SourceNotAllowed(REFUSED_REDIRECT, detail=str(exc)) from None
        if current.scheme == "https" and target.scheme == "http":
            raise SourceNotAllowed("upstream redirected from https to http (downgrade refused)")
        try:
            url_policy.check(target)
        except LoopDetected as exc:
            raise LoopDetected(REDIRECTED_BACK, detail=str(exc)) from None
        except SourceNotAllowed as exc:
            raise SourceNotAllowed(REFUSED_REDIRECT, detail=str(exc)) from None
        return target

    def _get(self, url: SourceURL, deadline: float, conditional: dict[str, str] | None = None) -> requests.Response:
        remaining = _remaining(deadline)
        try:
            response = self.session.get(
                str(url), stream=True, allow_redirects=False, timeout=(remaining, remaining),
                headers=conditional or None,
            )
        except ProxyError:
            raise
        except (requests.exceptions.ConnectTimeout, requests.exceptions.ReadTimeout):
            # The connect, like the read, is cut at the one deadline: fetch_source tells
            # whether that was the upstream's (504) or the request budget's (503, not stored).
            raise _DeadlinePassed from None
        except requests.exceptions.SSLError as exc:
            raise UpstreamFailed(TLS_FAILED, detail=_reason(exc)) from None
        except requests.exceptions.ConnectionError as exc:
            inner = _guard_error(exc)
            if inner is not None:
                raise inner from None
            if _is_dns_failure(exc):
                raise UpstreamFailed(UNRESOLVED, detail=f"{url.host}: {_reason(exc)}") from None
            raise UpstreamFailed(UNREACHABLE, detail=_reason(exc)) from None
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, ValueError) as exc:
            raise UpstreamFailed(UNREACHABLE, detail=_reason(exc)) from None
        status = response.status_code
        if status in (404, 410):
            response.close()
            raise SourceNotFound(f"upstream answered {status}")
        if status in (301, 302, 303, 307, 308) or (status == 304 and conditional):
            return response
        if status != 200:
            response.close()
            failure = UpstreamRefused if 400 <= status < 500 else UpstreamFailed
            raise failure(f"upstream answered {status}")
        declared = _declared_length(response)
        if declared is not None and declared > self.max_bytes:
            response.close()
            raise SourceTooLarge(f"source is {declared} bytes, over the {self.max_bytes}-byte limit")
        return response

    def _read_body(
        self, response: requests.Response, deadline: float, hold_bytes: Callable[[int], None] | None = None
    ) -> bytes:
        raw = response.raw
        chunks: list[bytes] = []
        size = 0
        held = 0
        try:
            while True:
                remaining = _remaining(deadline)
                sock = _socket_of(raw)
                if sock is not None:
                    sock.settimeout(remaining)
                # read1 returns what one recv brings, so a trickling body cannot stretch
                # the deadline: it is checked between reads and bounds each read. A server
                # that compresses anyway is decoded, and the byte cap counts decoded bytes.
                chunk = raw.read1(CHUNK, decode_content=True)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_bytes:
                    raise SourceTooLarge(f"source is over the {self.max_bytes}-byte limit")
                if hold_bytes is not None and size > held:
                    # Whole mebibytes ahead, so a 32 MiB body asks the ledger 32 times, not 500.
                    held = -(-size // HOLD_STEP) * HOLD_STEP
                    hold_bytes(held)
                chunks.append(chunk)
        except (TimeoutError, urllib3.exceptions.ReadTimeoutError):
            raise _DeadlinePassed from None
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError, OSError) as exc:
            raise UpstreamFailed(BROKE_OFF, detail=f"after {size} bytes: {_reason(exc)}") from None
        declared = _declared_length(response)
        encoded = response.headers.get("Content-Encoding", "identity").lower() != "identity"
        if declared is not None and not encoded and size < declared:
            raise UpstreamFailed(f"the upstream body ended after {size} of the {declared} bytes it announced")
        if hold_bytes is not None:
            hold_bytes(held + size)  # the join below holds the chunks and the body at once
        return b"".join(chunks)


def _declared_length(response: requests.Response) -> int | None:
    """Content-Length when it is plain ASCII digits, else None (the body is still capped as
    it streams). str.isdigit() is not enough: it accepts "²", which int() refuses."""
    declared = response.headers.get("Content-Length", "")
    return int(declared) if _DIGITS.fullmatch(declared) else None


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _DeadlinePassed
    return remaining


def _socket_of(raw: Any) -> socket.socket | None:
    # urllib3 keeps the live socket on the response's file object; reaching it lets each
    # read be bounded by the time left, not by a fixed read timeout.
    try:
        sock = raw._fp.fp.raw._sock
    except AttributeError:
        return None
    return sock if isinstance(sock, socket.socket) and sock.fileno() != -1 else None


def _redirect_target(response: requests.Response) -> str | None:
    if response.status_code in (301, 302, 303, 307, 308):
        location = response.headers.get("Location")
        if not location:
            raise UpstreamFailed(f"upstream answered {response.status_code} without a Location")
        return location
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__ or getattr(current, "reason", None)
        if not isinstance(current, BaseException):
            current = None
    return seen


def _guard_error(exc: BaseException) -> ProxyError | None:
    for inner in _chain(exc):
        if isinstance(inner, ProxyError):
            return inner
    return None


def _is_dns_failure(exc: BaseException) -> bool:
    return any(isinstance(inner, (NameResolutionError, socket.gaierror)) for inner in _chain(exc))


def _reason(exc: BaseException) -> str:
    text = str(_chain(exc)[-1]) or type(exc).__name__
    return text[:200]
