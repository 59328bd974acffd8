"""The front page at /: a static page (HTML, CSS, plain JS in ./static) and its config.json.

The page measures everything from real /image responses: each image's bytes from the body it
received, the source's bytes, size and format from /image's X-Source-* headers (stored with
the cache entry, so a hit stays one Redis GET). config.json tells it which widths the service
accepts. Every response here carries a strict CSP: the page's only script is front.js.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, current_app, jsonify

from app.image.params import DEFAULT_QUALITY
from app.settings import Settings

STATIC = Path(__file__).resolve().parent / "static"

bp = Blueprint("front", __name__, static_folder=STATIC, static_url_path="/front/static")

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

#: The usual breakpoints of a responsive image; the page drops those above the source width.
RESPONSIVE_WIDTHS = (320, 640, 960, 1280, 1920)


@bp.get("/", provide_automatic_options=False)
def index() -> Response:
    # A few kB, read per request: no open file handle to leak, and an edit shows on reload.
    response = Response((STATIC / "index.html").read_bytes(), mimetype="text/html")
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/front/config.json", provide_automatic_options=False)
def config() -> Response:
    settings: Settings = current_app.extensions["image_proxy"].settings
    response = jsonify(
        widths=responsive_widths(settings),
        max_width=settings.max_width,
        allowed_widths=list(settings.allowed_widths),
        default_quality=DEFAULT_QUALITY,
    )
    response.headers["Cache-Control"] = "no-store"
    return response


def responsive_widths(settings: Settings) -> list[int]:
    """The widths the page offers: the allowed ones when ALLOWED_WIDTHS is set (any other
    would be refused), else the usual breakpoints; never above MAX_WIDTH."""
    candidates = settings.allowed_widths or RESPONSIVE_WIDTHS
    return sorted({width for width in candidates if 0 < width <= settings.max_width})


@bp.after_request
def page_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = PAGE_CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
