"""Per-request observation: one access-log line and the metrics, from what the request left
in flask.g. Registered by create_app as after_request.

The line is logfmt (IMAGE_PROXY_LOG_FORMAT=text) or one JSON object with a "time" field
(json), built by app.log_format, which escapes control characters. "client" is the peer
address, or the X-Forwarded-For entry that trusted proxies vouch for (app.client_address).
"""

from __future__ import annotations

import logging
import time

from flask import Flask, Response, current_app, g, request

from app import metrics
from app.client_address import client_address
from app.image.params import ImageRequest
from app.image.serve import Served
from app.log_format import json_line, logfmt, utc_now

access_log = logging.getLogger("image_proxy.access")
#: Children resolved once: labels() takes a lock and builds a key on every call.
_CACHE_RESULTS = {status: metrics.CACHE.labels(status.lower()) for status in ("HIT", "MISS", "BYPASS", "STALE")}


def start_request() -> None:
    g.started = time.monotonic()


def finish_request(response: Response) -> Response:
    served = g.get("served")
    image_request = g.get("image_request")
    endpoint = request.endpoint or "unknown"
    fmt = image_request.format if image_request is not None else ""
    total_ms = (time.monotonic() - g.get("started", time.monotonic())) * 1000
    settings = current_app.extensions["image_proxy"].settings
    forwarded_for = ",".join(request.headers.getlist("X-Forwarded-For"))
    record: dict[str, object] = {
        "client": client_address(request.remote_addr, forwarded_for, settings.trusted_proxies),
        "method": request.method,
        "path": request.path,
        "status": response.status_code,
        "cache": served.cache_status if served else "",
        "bytes": response.content_length or 0,
        "upstream_ms": round(served.timings.upstream_s * 1000, 1) if served else 0,
        "render_ms": round(served.timings.render_s * 1000, 1) if served else 0,
        # The render's estimated peak, admitted into the memory budget (0: nothing rendered).
        "mem_estimate_mb": round(served.timings.memory_estimate / 2**20, 1) if served else 0,
        "total_ms": round(total_ms, 1),
    }
    if image_request is not None:
        # The source host, not the full URL: query strings of sources can carry tokens.
        record.update(source=image_request.url.host, w=image_request.width, q=image_request.quality, format=fmt)
    error = g.get("error_reason") or (served.entry.error if served and not served.entry.ok else "")
    if error:
        record["error"] = error
    _log(record, settings.log_format)
    _count(endpoint, response, served, image_request)
    return response


def _log(record: dict[str, object], log_format: str) -> None:
    if log_format == "json":
        # json_ready: the JSON formatter writes this message as the whole line.
        access_log.info(json_line({"time": utc_now(), **record}), extra={"json_ready": True})
    else:
        access_log.info(logfmt(record))


def _count(endpoint: str, response: Response, served: Served | None, image_request: ImageRequest | None) -> None:
    fmt = image_request.format if image_request is not None else ""
    metrics.REQUESTS.labels(endpoint, str(response.status_code), fmt).inc()
    if g.get("error_kind"):
        metrics.ERRORS.labels(g.error_kind).inc()
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
    if response.status_code == 200 and request.method == "GET":
        metrics.OUTPUT_BYTES.inc(response.content_length or 0)


def install(app: Flask) -> None:
    app.before_request(start_request)
    app.after_request(finish_request)
