"""The fresh-hit path: a WSGI layer in front of the Flask app that answers GET and HEAD
/image from a fresh cache entry without Flask's request context, routing and hooks.

A cache hit is one Redis round trip; what it costs besides is the framework around it, and
at thousands of hits per second that was most of a worker's CPU. This layer reads the request
with the same code as the blueprint (views.read_request), sends the same headers
(views.image_headers), and writes the same log line and metrics (observe.record). Anything
else — a miss, a stale entry, an error, a conditional request, Redis down, a request on the
metrics listener — goes to Flask, with the Redis look this layer made (so the miss path
does not look again).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flask import Flask
from werkzeug.wrappers import Request

from app import __version__, observe
from app.image.params import ImageRequest
from app.image.views import LOOKED, image_headers, read_request
from app.listener import arrived_on
from app.settings import Settings

WSGIApp = Any  # (environ, start_response) -> iterable of bytes
PARSED_MAX = 4096
#: Keys (query string, Host, Accept, Via...) longer than this are not remembered, so the memo
#: stays under PARSED_MAX x a few KB per worker whatever clients send.
PARSED_KEY_MAX = 3072


class FreshHits:
    def __init__(self, app: Flask, next_app: WSGIApp) -> None:
        self.services = app.extensions["image_proxy"]
        self.next_app = next_app
        self._parsed: dict[tuple[str, ...], ImageRequest] = {}

    def _read(self, req: Request, settings: Settings) -> ImageRequest:
        """read_request, remembered: it is a pure function of the query string, Host,
        Accept and Via (settings are fixed), and a page asks for the same URLs again and
        again. Failures raise and are not kept. Emptied at PARSED_MAX entries, so a flood of
        distinct URLs costs at most that much memory."""
        environ = req.environ
        key = (environ.get("QUERY_STRING", ""), environ.get("HTTP_HOST", ""), environ.get("HTTP_ACCEPT", ""),
               environ.get("HTTP_VIA", ""), environ.get("SERVER_NAME", ""), str(environ.get("SERVER_PORT", "")))
        found = self._parsed.get(key)
        if found is None:
            found, _ = read_request(req, settings)
            if sum(map(len, key)) <= PARSED_KEY_MAX:  # large keys are parsed, never kept
                if len(self._parsed) >= PARSED_MAX:
                    self._parsed.clear()
                self._parsed[key] = found
        return found

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD")
        if environ.get("PATH_INFO") != "/image" or method not in ("GET", "HEAD") or "HTTP_IF_NONE_MATCH" in environ:
            return self.next_app(environ, start_response)
        settings = self.services.settings
        if settings.metrics_bind and arrived_on(environ, settings.metrics_bind):
            return self.next_app(environ, start_response)  # Flask answers 404 there
        started = time.monotonic()
        req = Request(environ)
        service = self.services.service
        try:
            image_request = self._read(req, settings)
        except Exception:
            # A bad parameter (or a bug): Flask's path reads the request again and answers it
            # with the one error handling there is.
            return self.next_app(environ, start_response)
        look = service.cache_look(image_request)
        served = service.fresh_hit(look)
        if served is None:
            # Anything but a fresh image: Flask serves it with this look (None: Redis is
            # down), so a request looks Redis up once.
            environ[LOOKED] = (look,)
            return self.next_app(environ, start_response)
        headers = [*image_headers(served, image_request), ("X-Image-Proxy-Version", __version__)]
        body = served.entry.body
        observe.record(settings, req, 200, len(body), served, image_request, started, endpoint="image.image")
        start_response("200 OK", headers)
        return [body] if method == "GET" else []

