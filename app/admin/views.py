"""POST /admin/warm and POST /admin/purge: the operator's handles on the cache lifecycle.

Registered only when IMAGE_PROXY_ADMIN_TOKEN is set (otherwise /admin/* is a 404). Every
request needs exactly `Authorization: Bearer <token>`, compared in constant time; anything
else is a JSON 401. Answers are never cached (no-store), and only POST is routed (GET: 405).

warm renders a source's family (widths x formats at one q) through the normal serve path,
so it is admitted like any miss and downloads the source once (source reuse). purge deletes
every variant, the kept source and the freshness record of one source URL.
"""

from __future__ import annotations

import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from app import metrics
from app.cache import CacheUnavailable
from app.errors import BadParameter, ProxyError
from app.guard import URLPolicy, parse_source_url
from app.image.params import parse_request, source_digest
from app.image.views import self_origins
from app.responses import error_response

bp = Blueprint("admin", __name__, url_prefix="/admin")
log = logging.getLogger("image_proxy.admin")

#: One warm call renders at most this many variants: it holds a request thread throughout.
MAX_VARIANTS = 64


@bp.before_request
def require_token() -> Response | None:
    token = current_app.extensions["image_proxy"].settings.admin_token
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        response = error_response(401, "missing or wrong admin token (Authorization: Bearer <token>)")
        response.headers["WWW-Authenticate"] = 'Bearer realm="image-proxy admin"'
        return response
    return None


@bp.after_request
def never_cached(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response


def _body() -> dict[str, Any]:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise BadParameter("body: expected a JSON object")
    return data


def _url_policy() -> URLPolicy:
    settings = current_app.extensions["image_proxy"].settings
    return URLPolicy(allowed_hosts=settings.allowed_hosts, self_origins=self_origins(settings.bind))


@bp.post("/warm")
def warm() -> Response:
    """{"url": ..., "widths": [320, 640], "formats": ["webp", "avif"], "q": 75 or "auto"}"""
    services = current_app.extensions["image_proxy"]
    data = _body()
    widths, formats = data.get("widths", [0]), data.get("formats", ["webp"])
    if not isinstance(widths, list) or not all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
        raise BadParameter("widths: expected a list of whole numbers")
    if not isinstance(formats, list) or not all(isinstance(f, str) for f in formats) or "auto" in formats:
        raise BadParameter("formats: expected a list of webp / avif")
    if not isinstance(data.get("url"), str):
        raise BadParameter("url: missing (give an absolute http or https URL)")
    quality = data.get("q", 75)
    # q=auto costs several encodes a miss: warming its srcset family ahead is where it pays.
    if quality != "auto" and (not isinstance(quality, int) or isinstance(quality, bool)):
        raise BadParameter('q: expected a whole number 1..100 or "auto"')
    pairs = [(w, f) for f in dict.fromkeys(formats) for w in dict.fromkeys(widths)]
    if not pairs or len(pairs) > MAX_VARIANTS:
        raise BadParameter(f"widths x formats: give 1..{MAX_VARIANTS} variants")
    policy = _url_policy()
    requests = [parse_request({"url": [data["url"]], "w": [str(w)], "q": [str(quality)], "format": [f]},
                              "", services.settings, policy) for w, f in pairs]

    def one(index: int) -> dict[str, Any]:
        started = time.monotonic()
        width, fmt = pairs[index]
        try:
            entry = services.service.serve(requests[index], policy).entry
            status, size = entry.status, len(entry.body) if entry.ok else 0
        except ProxyError as exc:
            status, size = exc.status, 0
        return {"w": width, "format": fmt, "status": status, "bytes": size,
                "ms": round((time.monotonic() - started) * 1000, 1)}

    # As many at once as this worker renders at once: the source is downloaded by the first
    # and kept for the rest (one source claim), and admission sees ordinary misses.
    with ThreadPoolExecutor(max(1, services.settings.render_slots)) as pool:
        variants = list(pool.map(one, range(len(pairs))))
    return jsonify(variants=variants)


@bp.post("/purge")
def purge() -> Response | tuple[Response, int]:
    """{"url": ...} -> {"purged": N}: variants (every width, q and format) + the kept source."""
    services = current_app.extensions["image_proxy"]
    data = _body()
    if not isinstance(data.get("url"), str):
        raise BadParameter("url: missing (give an absolute http or https URL)")
    # The same normalization /image keys by (dot segments, escapes): any spelling purges.
    url = parse_source_url(data["url"])
    try:
        purged = services.cache.purge(source_digest(url))
    except CacheUnavailable as exc:
        log.warning("purge: %s", exc)
        return error_response(503, "redis unavailable", retry_after=5), 503
    metrics.PURGED.inc(purged)
    return jsonify(purged=purged)
