"""Name the source format from its first bytes; the upstream's Content-Type is never trusted."""

from __future__ import annotations

from app.errors import BadSource
from app.render.canvas import Canvas, RenderOptions

_AVIF_BRANDS = (b"avif", b"avis")


def sniff_format(data: bytes) -> str | None:
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp" and _is_avif_ftyp(data):
        return "avif"
    if head[:2] == b"BM" and len(head) >= 26:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def _is_avif_ftyp(data: bytes) -> bool:
    size = int.from_bytes(data[:4], "big")
    if not 16 <= size <= 4096 or len(data) < size:
        return False
    brands = [data[8:12]] + [data[i : i + 4] for i in range(16, size - 3, 4)]
    return any(brand in _AVIF_BRANDS for brand in brands)


def _describe(data: bytes) -> str:
    head = data[:512].lstrip().lower()
    if not data:
        return "the upstream body is empty"
    if head.startswith(b"<svg") or b"<svg" in head:
        return "SVG is not a supported input"
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "the upstream sent an HTML page, not an image"
    return "the upstream body is not a supported image (JPEG, PNG, GIF, WebP, AVIF, BMP, TIFF)"


def supported_format(data: bytes, input_formats: frozenset[str]) -> str:
    """The format of `data` when it is one this service decodes, else BadSource (400)."""
    found = sniff_format(data)
    if found is None:
        raise BadSource(_describe(data))
    if found not in input_formats:
        raise BadSource(f"{found.upper()} input is switched off on this service (IMAGE_PROXY_INPUT_FORMATS)")
    return found


def sniff(canvas: Canvas, options: RenderOptions) -> None:
    canvas.source_format = supported_format(canvas.data, options.input_formats)
