"""Response shapes shared by every endpoint: the JSON error body and the security headers."""

from __future__ import annotations

from flask import Response, json

#: Sent with every image and every error from /image: an image URL opened directly in a
#: browser can run nothing, and any page may read it (the CORS-bypass use case).
IMAGE_SECURITY_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "X-Content-Type-Options": "nosniff",
}


def error_response(status: int, message: str, *, retry_after: int | None = None) -> Response:
    response = Response(
        json.dumps({"error": message}) + "\n", status=status, content_type="application/json"
    )
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response
