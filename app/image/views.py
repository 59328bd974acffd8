"""The /image blueprint: the only code that reads flask.request for images."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import unquote

from flask import Blueprint, Response, current_app, g, request

from app.errors import LoopDetected
from app.guard import URLPolicy
from app.image.params import ImageRequest, parse_request
from app.image.serve import ImageService, Served
from app.responses import IMAGE_SECURITY_HEADERS, error_response

bp = Blueprint("image", __name__)

CACHE_CONTROL = "public, max-age=31536000, immutable"


def _service() -> ImageService:
    return current_app.extensions["image_proxy"].service


@bp.route("/image", methods=["GET", "HEAD"], provide_automatic_options=False)
def image() -> Response:
    settings = current_app.extensions["image_proxy"].settings
    token = settings.via_token.lower()
    for via in request.headers.getlist("Via"):
        if token in via.lower():
            raise LoopDetected("this request already passed through this service (Via header); refusing a loop")
    url_policy = URLPolicy(allowed_hosts=settings.allowed_hosts, self_origins=self_origins(settings.bind))
    image_request = parse_request(
        request.args.to_dict(flat=False), request.headers.get("Accept", ""), settings, url_policy
    )
    g.image_request = image_request
    served = _service().serve(image_request, url_policy)
    g.served = served
    return image_response(served, image_request)


def self_origins(bind: str) -> frozenset[str]:
    """host:port pairs that reach this service: what the client called, and the bind."""
    origins = set()
    host = request.host.lower()
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


def image_response(served: Served, image_request: ImageRequest) -> Response:
    entry = served.entry
    if not entry.ok:
        response = error_response(entry.status, entry.error, retry_after=entry.retry_after)
    elif entry.etag and request.if_none_match.contains_weak(entry.etag.strip('"')):
        response = Response(status=304)
    else:
        response = Response(entry.body, status=200, content_type=entry.content_type)
        response.headers["Content-Disposition"] = content_disposition(image_request)
    if entry.ok:
        response.headers["Cache-Control"] = CACHE_CONTROL
        response.headers["ETag"] = entry.etag
        response.headers.update(source_headers(entry.meta))
    if image_request.negotiated:
        response.headers["Vary"] = "Accept"
    response.headers["X-Cache"] = served.cache_status
    response.headers.update(IMAGE_SECURITY_HEADERS)
    return response


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
