"""A real HTTP upstream on 127.0.0.1 for the tests: corpus files and misbehaving routes.

Routes (every path may start with /v/<nonce>/ to make a fresh URL for the same file):
  /photos/<name>, /edge/<name>   corpus files, always sent as image/jpeg (type must be sniffed)
  /status/<code>                 that status with a short body
  /redirect/<n>/<rest>           n redirect hops, then /<rest>
  /to?url=<absolute url>         one 302 to that URL
  /trickle?bytes=N&every=S       valid headers, then one byte every S seconds
  /endless                       a body that never ends (bounded to 60 s)
  /declared-large                Content-Length far over any cap
  /short                         Content-Length 1000, 10 bytes, then close
  /echo                          the request headers as JSON
  /gzip/<path>                   /<path> gzip-compressed with Content-Encoding: gzip (unasked)
  /page/<name>                   an HTML page a test put in `Upstream.pages`
  /blob/<name>                   bytes a test or benchmark put in `Upstream.blobs` (generated
                                 images, junk bodies), sent as image/jpeg
  /slow-image/<delay>/<path>     waits <delay> seconds, then serves /<path>
  /slow-first/<delay>/<path>     like slow-image for the first request of that path only
  /set-cookies?flood=N&size=S&then=<path>
                                 Set-Cookie in its variants (plain, Path, Domain= the host,
                                 its parent, an IP), plus N cookies of S bytes; a 302 to
                                 <path> when `then` is given, else a small 200
  /validated/<path>              /<path> with ETag + Last-Modified; honours If-None-Match /
                                 If-Modified-Since with 304. Switches (keyed by <path>):
                                 `replaced[path] = other` serves /<other>'s bytes instead (a
                                 changed source: new ETag and Last-Modified); `failing[path] =
                                 503` (any status) or "refuse" (the connection is closed
                                 without an answer). Counted in `conditional` (requests that
                                 carried a validator), `not_modified` (304s) and `bodies`.
Hits are counted per path (without the /v/<nonce> prefix) so tests can assert fetch counts.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def corpus_dir() -> Path:
    for candidate in (CORPUS, Path(__file__).resolve().parent / "corpus"):
        if (candidate / "photos").is_dir():
            return candidate
    raise RuntimeError(f"corpus not found at {CORPUS}")


class Upstream:
    def __init__(self) -> None:
        self.corpus = corpus_dir()
        self.hits: Counter[str] = Counter()
        self.headers_seen: list[dict[str, str]] = []
        self.pages: dict[str, str] = {}
        self.blobs: dict[str, bytes] = {}
        self.replaced: dict[str, str] = {}
        self.failing: dict[str, int | str] = {}
        self.conditional: Counter[str] = Counter()
        self.not_modified: Counter[str] = Counter()
        self.bodies: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        handler = type("Handler", (_Handler,), {"upstream": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def record(self, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.hits[path] += 1
            self.headers_seen.append(headers)

    def reset(self) -> None:
        with self._lock:
            self.hits.clear()
            self.headers_seen.clear()
            self.replaced.clear()
            self.failing.clear()
            self.conditional.clear()
            self.not_modified.clear()
            self.bodies.clear()
            self.blobs.clear()

    def count(self, counter: Counter[str], path: str) -> None:
        with self._lock:
            counter[path] += 1

    def start(self) -> Upstream:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    upstream: Upstream
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        path = re.sub(r"^/v/[^/]+", "", parts.path)
        query = parse_qs(parts.query)
        self.upstream.record(path, dict(self.headers.items()))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._route(path, query)

    def _send(self, status: int, body: bytes, content_type: str = "image/jpeg", extra: dict[str, str] | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_cut_short(self, declared: int, body: bytes) -> None:
        """Promise `declared` bytes, send `body`, hang up."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _set_cookies(self, query: dict[str, list[str]]) -> None:
        host = self.headers.get("Host", "").rsplit(":", 1)[0]
        parent = host.split(".", 1)[-1]
        cookies = [
            "plain=1",
            "with_path=1; Path=/",
            f"own_domain=1; Domain={host}",
            f"parent_domain=1; Domain=.{parent}",  # a.shared.test sets it for every *.shared.test
            "ip_domain=1; Domain=127.0.0.1",
            "long_lived=1; Max-Age=31536000; Path=/",
        ]
        size = int(query.get("size", ["4000"])[0])
        cookies += [f"flood{i}={'x' * size}; Path=/" for i in range(int(query.get("flood", ["0"])[0]))]
        then = query.get("then", [None])[0]
        self.send_response(302 if then else 200)
        for cookie in cookies:
            self.send_header("Set-Cookie", cookie)
        if then:
            self.send_header("Location", then)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def _route(self, path: str, query: dict[str, list[str]]) -> None:
        up = self.upstream
        if match := re.fullmatch(r"/(photos|edge)/([A-Za-z0-9_.-]+)", path):
            file = up.corpus / match.group(1) / match.group(2)
            if not file.is_file():
                return self._send(404, b"not found", "text/plain")
            return self._send(200, file.read_bytes(), extra={"Cache-Control": "no-cache", "Set-Cookie": "up=1"})
        if match := re.fullmatch(r"/status/([0-9]{3})", path):
            return self._send(int(match.group(1)), b"status body", "text/plain")
        if match := re.fullmatch(r"/redirect/([0-9]+)/(.*)", path):
            hops = int(match.group(1))
            target = f"/redirect/{hops - 1}/{match.group(2)}" if hops > 1 else f"/{match.group(2)}"
            return self._send(302, b"", "text/plain", {"Location": target})
        if path == "/to":
            return self._send(302, b"", "text/plain", {"Location": query["url"][0]})
        if path == "/trickle":
            total = int(query.get("bytes", ["100"])[0])
            every = float(query.get("every", ["0.5"])[0])
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(total))
            self.end_headers()
            data = (up.corpus / "photos" / "waterfall_1800x1200.jpg").read_bytes()
            for i in range(total):
                if up._stop.is_set():
                    return
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
                time.sleep(every)
            return None
        if path == "/endless":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            chunk = b"\xff\xd8\xff" + b"\0" * 65533
            give_up = time.monotonic() + 60
            while time.monotonic() < give_up and not up._stop.is_set():
                self.wfile.write(chunk)
            self.close_connection = True
            return None
        if path == "/declared-large":
            return self._send_cut_short(10**12, b"\xff\xd8\xff")
        if path == "/short":
            return self._send_cut_short(1000, b"\xff\xd8\xff" + b"\0" * 7)
        if match := re.fullmatch(r"/page/([A-Za-z0-9_.-]+)", path):
            html = up.pages.get(match.group(1))
            if html is None:
                return self._send(404, b"no such page", "text/plain")
            return self._send(200, html.encode(), "text/html; charset=utf-8")
        if match := re.fullmatch(r"/blob/([A-Za-z0-9_.-]+)", path):
            blob = up.blobs.get(match.group(1))
            if blob is None:
                return self._send(404, b"no such blob", "text/plain")
            return self._send(200, blob)
        if match := re.fullmatch(r"/gzip/(photos|edge)/([A-Za-z0-9_.-]+)", path):
            import gzip

            body = gzip.compress((up.corpus / match.group(1) / match.group(2)).read_bytes())
            return self._send(200, body, extra={"Content-Encoding": "gzip"})
        if path == "/set-cookies":
            return self._set_cookies(query)
        if path == "/echo":
            return self._send(200, json.dumps(dict(self.headers.items())).encode(), "application/json")
        if match := re.fullmatch(r"/validated/((?:photos|edge)/[A-Za-z0-9_.-]+)", path):
            return self._validated(match.group(1))
        if match := re.fullmatch(r"/slow-image/([0-9.]+)/(.*)", path):
            time.sleep(float(match.group(1)))
            return self._route("/" + match.group(2), query)
        if match := re.fullmatch(r"/slow-first/([0-9.]+)/(.*)", path):
            if up.hits[path] == 1:
                time.sleep(float(match.group(1)))
            return self._route("/" + match.group(2), query)
        return self._send(404, b"no such route", "text/plain")

    def _validated(self, path: str) -> None:
        import hashlib
        from email.utils import formatdate

        up = self.upstream
        failing = up.failing.get(path)
        if failing == "refuse":
            self.close_connection = True
            return None
        if failing is not None:
            return self._send(int(failing), b"upstream is down", "text/plain")
        file = up.corpus / up.replaced.get(path, path)
        body = file.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        # A different file gives a different (later) Last-Modified, like a re-upload would.
        modified = formatdate(1_600_000_000 + int(hashlib.sha256(body).hexdigest()[:6], 16), usegmt=True)
        validators = {"ETag": etag, "Last-Modified": modified}
        inm, ims = self.headers.get("If-None-Match"), self.headers.get("If-Modified-Since")
        if inm or ims:
            up.count(up.conditional, path)
            if (inm and inm == etag) or (not inm and ims == modified):
                up.count(up.not_modified, path)
                self.send_response(304)
                for name, value in validators.items():
                    self.send_header(name, value)
                self.end_headers()
                return None
        up.count(up.bodies, path)
        return self._send(200, body, extra=validators)


class Blackhole:
    """A loopback address:port where connect() hangs, as on a dead route: a listener with
    backlog 0 whose one queue place is taken, so Linux drops every further SYN."""

    def __init__(self, host: str, port: int = 0) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((host, port))
        self.listener.listen(0)
        self.host, self.port = self.listener.getsockname()[:2]
        self.fillers: list[socket.socket] = []
        for _ in range(8):  # bounded: the queue is full after one or two
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.settimeout(0.2)
            self.fillers.append(filler)
            try:
                filler.connect((self.host, self.port))
            except TimeoutError:
                return  # this SYN was dropped: so will every later one be
        self.close()
        raise RuntimeError(f"could not fill the accept queue of {self.host}:{self.port}")

    def close(self) -> None:
        for sock in (*self.fillers, self.listener):
            sock.close()


if __name__ == "__main__":
    # `python -m tests.upstream`: run the upstream on its own (benchmarks), print its port.
    import signal
    import sys

    server = Upstream().start()
    print(server.port, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    finally:
        server.stop()
