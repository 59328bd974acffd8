"""Per-request observation: one access-log line and the metrics, from what the request left
in flask.g. Registered by create_app as after_request.

The line is logfmt (IMAGE_PROXY_LOG_FORMAT=text) or one JSON object with a "time" field
(json), built by app.log_format, which escapes control characters. "client" is the peer
address, or the X-Forwarded-For entry that trusted proxies vouch for (app.client_address).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from flask import Flask, Response, current_app, g, request
from werkzeug.wrappers import Request

from app import metrics
from app.client_address import client_address
from app.image.miss import Served
from app.image.params import ImageRequest
from app.log_format import json_line, logfmt, utc_now
from app.settings import Settings

access_log = logging.getLogger("image_proxy.access")
#: Children resolved once: labels() takes a lock and builds a key on every call.
_CACHE_RESULTS = {status: metrics.CACHE.labels(status.lower()) for status in ("HIT", "MISS", "BYPASS", "STALE")}


def start_request() -> None:
    g.started = time.monotonic()


def finish_request(response: Response) -> Response:
    record(current_app.extensions["image_proxy"].settings, request, response.status_code,
           response.content_length or 0, g.get("served"), g.get("image_request"),
           g.get("started", time.monotonic()), endpoint=request.endpoint or "unknown",
           error_reason=g.get("error_reason"), error_kind=g.get("error_kind"))
    return response


def record(
    settings: Settings, req: Request, status: int, sent_bytes: int, served: Served | None,
    image_request: ImageRequest | None, started: float,
    *, endpoint: str, error_reason: str | None = None, error_kind: str | None = None,
) -> None:
    """One request's log line and metrics: called by Flask's after_request and by the
    fresh-hit path (app/image/fresh_hits.py), so both write the same line."""
    fmt = image_request.format if image_request is not None else ""
    total_ms = (time.monotonic() - started) * 1000
    forwarded_for = req.environ.get("HTTP_X_FORWARDED_FOR", "")
    line: dict[str, object] = {
        "client": client_address(req.remote_addr, forwarded_for, settings.trusted_proxies),
        "method": req.method,
        "path": req.path,
        "status": status,
        "cache": served.cache_status if served else "",
        "bytes": sent_bytes,
        "upstream_ms": round(served.timings.upstream_s * 1000, 1) if served else 0,
        "render_ms": round(served.timings.render_s * 1000, 1) if served else 0,
        # The render's estimated peak, admitted into the memory budget (0: nothing rendered).
        "mem_estimate_mb": round(served.timings.memory_estimate / 2**20, 1) if served else 0,
        "total_ms": round(total_ms, 1),
    }
    if image_request is not None:
        # The source host, not the full URL: query strings of sources can carry tokens.
        line.update(source=image_request.url.host, w=image_request.width, q=image_request.quality, format=fmt)
    error = error_reason or (served.entry.error if served and not served.entry.ok else "")
    if error:
        line["error"] = error
    _log(line, settings.log_format)
    _count(endpoint, req.method, status, sent_bytes, served, image_request, error_kind)


def _log(record: dict[str, object], log_format: str) -> None:
    if log_format == "json":
        # json_ready: the JSON formatter writes this message as the whole line.
        access_log.info(json_line({"time": utc_now(), **record}), extra={"json_ready": True})
    else:
        access_log.info(logfmt(record))


def _count(endpoint: str, method: str, status: int, sent_bytes: int, served: Served | None,
           image_request: ImageRequest | None, error_kind: str | None) -> None:
    fmt = image_request.format if image_request is not None else ""
    _requests_child(endpoint, status, fmt).inc()
    if error_kind:
        metrics.ERRORS.labels(error_kind).inc()
    if served is None or image_request is None:
        return
    _CACHE_RESULTS[served.cache_status].inc()
    if served.cache_status == "STALE":
        metrics.STALE_SERVES.inc()
    if not served.entry.ok:
        metrics.ERRORS.labels(served.entry.kind).inc()
    timings = served.timings
    if served.waited:
        metrics.DEDUP_WAITS.inc()
        metrics.DEDUP_WAIT_SECONDS.observe(timings.wait_s)
    if timings.upstream_s:
        metrics.UPSTREAM_SECONDS.observe(timings.upstream_s)
        metrics.SOURCE_BYTES.inc(timings.source_bytes)
    if timings.render_s:
        metrics.RENDER_SECONDS.labels(fmt, metrics.width_bucket(image_request.width)).observe(timings.render_s)
    if status == 200 and method == "GET":
        metrics.OUTPUT_BYTES.inc(sent_bytes)


@functools.lru_cache(maxsize=512)
def _requests_child(endpoint: str, status: int, fmt: str) -> Any:
    # labels() takes a lock and builds a key on every call; the combinations are few
    # (endpoints x statuses x formats), and the cache is bounded anyway.
    return metrics.REQUESTS.labels(endpoint, str(status), fmt)


def install(app: Flask) -> None:
    app.before_request(start_request)
    app.after_request(finish_request)
