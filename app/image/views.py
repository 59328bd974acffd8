"""The /image blueprint, and the pieces of it the fresh-hit path (app/image/fresh_hits.py)
shares: reading a request into an ImageRequest, and the response for a Served entry. Both take
the werkzeug request explicitly, so the two paths cannot answer differently."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import unquote

from flask import Blueprint, Response, current_app, g, request
from werkzeug.wrappers import Request

from app.errors import LoopDetected
from app.guard import URLPolicy
from app.image.miss import Served
from app.image.params import ImageRequest, check_signature, parse_request
from app.image.quality_meta import AUTO_QUALITY
from app.responses import IMAGE_SECURITY_HEADERS, error_response
from app.settings import Settings

bp = Blueprint("image", __name__)

CACHE_CONTROL = "public, max-age=31536000, immutable"
#: The environ key carrying the fresh-hit layer's Redis look to this view: a 1-tuple (the
#: Look, or None when Redis was unavailable), so a request looks Redis up once.
LOOKED = "image_proxy.looked"


@bp.route("/image", methods=["GET", "HEAD"], provide_automatic_options=False)
def image() -> Response:
    services = current_app.extensions["image_proxy"]
    image_request, url_policy = read_request(request, services.settings)
    g.image_request = image_request
    # The fresh-hit layer in front (fresh_hits.py) already looked Redis up for this request.
    served = services.service.serve(image_request, url_policy, request.environ.get(LOOKED))
    g.served = served
    return image_response(served, image_request, request)


def read_request(req: Request, settings: Settings) -> tuple[ImageRequest, URLPolicy]:
    """The ImageRequest and the URL policy for one /image request, or a ProxyError (400, or
    403 for a missing or wrong signature). Both the Flask view and the fresh-hit path call
    this before they look at the cache, so neither serves an unsigned URL."""
    args = req.args.to_dict(flat=False)
    if settings.signing_keys:
        check_signature(args, settings.signing_keys)
    # WSGI joins repeated Via headers into one value, so one environ lookup sees them all.
    if settings.via_token.lower() in req.environ.get("HTTP_VIA", "").lower():
        raise LoopDetected("this request already passed through this service (Via header); refusing a loop")
    url_policy = URLPolicy(allowed_hosts=settings.allowed_hosts, self_origins=self_origins(settings.bind, req.host))
    image_request = parse_request(args, req.headers.get("Accept", ""), settings, url_policy)
    return image_request, url_policy


def self_origins(bind: str, called_host: str | None = None) -> frozenset[str]:
    """host:port pairs that reach this service: what the client called, and the bind."""
    origins = set()
    host = (called_host if called_host is not None else request.host).lower()
    if re.fullmatch(r".*:[0-9]+", host) and not host.endswith("]"):
        origins.add(host)
    else:
        origins.update({f"{host}:80", f"{host}:443"})
    if not bind.startswith("unix:"):
        bind_host, _, bind_port = bind.lower().rpartition(":")
        origins.add(f"{bind_host}:{bind_port}")
        if bind_host in ("0.0.0.0", "[::]"):
            # Bound to every address: each loopback spelling reaches this service too.
            origins.update(f"{name}:{bind_port}" for name in ("127.0.0.1", "localhost", "[::1]", "0.0.0.0"))
    return frozenset(origins)


def image_response(served: Served, image_request: ImageRequest, req: Request) -> Response:
    entry = served.entry
    if not entry.ok:
        response = error_response(entry.status, entry.error, retry_after=entry.retry_after)
        response.headers.update(_common_headers(served, image_request))
        return response
    if entry.etag and req.if_none_match.contains_weak(entry.etag.strip('"')):
        return Response(status=304, headers=image_headers(served, image_request, with_body=False))
    return Response(entry.body, status=200, headers=image_headers(served, image_request))


def image_headers(served: Served, image_request: ImageRequest, *, with_body: bool = True) -> list[tuple[str, str]]:
    """Every header of a successful image answer (a 304 has all but those of the body), as
    one list: the fresh-hit path sends it as is, the Flask view builds a Response from it."""
    entry = served.entry
    headers = [("Cache-Control", CACHE_CONTROL), ("ETag", entry.etag), *source_headers(entry.meta).items(),
               *_common_headers(served, image_request)]
    if with_body:
        headers += [("Content-Disposition", content_disposition(image_request)),
                    ("Content-Type", entry.content_type), ("Content-Length", str(len(entry.body)))]
    return headers


def _common_headers(served: Served, image_request: ImageRequest) -> list[tuple[str, str]]:
    headers = [("X-Cache", served.cache_status), *IMAGE_SECURITY_HEADERS.items()]
    if image_request.negotiated:
        headers.append(("Vary", "Accept"))
    return headers


#: The source as the proxy fetched it, read from the entry's meta (no extra Redis call), so
#: `curl -I` and the front page can show the saving; readable by cross-origin scripts too.
SOURCE_HEADERS = {
    "X-Source-Bytes": "source_bytes",
    "X-Source-Width": "source_width",
    "X-Source-Height": "source_height",
    "X-Source-Format": "source_format",
}


def source_headers(meta: Mapping[str, object]) -> dict[str, str]:
    # Entries stored before a field existed lack it; its header is then left out, not guessed.
    headers = {name: str(meta[key]) for name, key in SOURCE_HEADERS.items() if meta.get(key)}
    # Only q=auto answers say what they chose (app/image/quality_meta.py): a fixed q is in the URL.
    if meta.get(AUTO_QUALITY):
        headers["X-Quality"] = str(meta[AUTO_QUALITY])
    if headers:
        headers["Access-Control-Expose-Headers"] = ", ".join([*headers, "X-Cache"])
    return headers


_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._ -]+")


def content_disposition(image_request: ImageRequest) -> str:
    path = image_request.url.path_and_query.split("?", 1)[0]
    name = unquote(path.rsplit("/", 1)[-1])
    stem = name.rsplit(".", 1)[0] if "." in name else name
    stem = _UNSAFE_FILENAME.sub("_", stem).strip(" ._")[:100] or "image"
    return f'inline; filename="{stem}.{image_request.format}"'
