"""Open the source with the one Pillow plugin its bytes were sniffed as; read the header only."""

from __future__ import annotations

import io
import logging

from PIL import Image, UnidentifiedImageError

from app.errors import BadSource
from app.render.canvas import Canvas, RenderOptions
from app.render.gif_canvas import gif_canvas_size

log = logging.getLogger("image_proxy.render")

# Pillow's own bomb check would stop at its fixed limit with a warning or its own error;
# check_pixels applies MAX_SOURCE_PIXELS from the header instead, before any decoding.
Image.MAX_IMAGE_PIXELS = None

PILLOW_FORMATS = {
    "jpeg": "JPEG",
    "png": "PNG",
    "gif": "GIF",
    "webp": "WEBP",
    "avif": "AVIF",
    "bmp": "BMP",
    "tiff": "TIFF",
}
ANIMATED_FORMATS = frozenset({"gif", "png", "webp", "avif"})


def open_source(canvas: Canvas, options: RenderOptions) -> None:
    grown = gif_canvas_size(canvas.data) if canvas.source_format == "gif" else None
    if grown is not None and grown[0] * grown[1] > options.max_pixels:
        # Pillow would allocate the oversized first frame's disposal area inside open() itself;
        # the size is enough for check_pixels to refuse it, so the file is not opened at all.
        canvas.source_size = grown
        return
    try:
        image = Image.open(io.BytesIO(canvas.data), formats=[PILLOW_FORMATS[canvas.source_format]])
        frame_count = int(getattr(image, "n_frames", 1) or 1)
    except UnidentifiedImageError:
        # Pillow's own message names a BytesIO object's address: useless to a client.
        raise BadSource(f"not a valid {canvas.source_format.upper()} file (its header does not parse)") from None
    except Exception as exc:  # any failure to parse upstream bytes is the upstream's fault
        # Pillow's text can quote the file's own bytes: the client gets the kind, the log the rest.
        log.info("cannot read the %s header: %r", canvas.source_format, _short(exc))
        raise BadSource(f"cannot read the {canvas.source_format.upper()} header (corrupt or unsupported)") from None
    if canvas.source_format not in ANIMATED_FORMATS:
        # A multi-page TIFF is a document, not an animation (pages may differ in size): page 1 only.
        frame_count = 1
    canvas.image = image
    canvas.source_size = image.size
    if grown is not None:
        # Frames may overhang the logical screen, and Pillow grows the canvas to fit them.
        canvas.source_size = (max(image.width, grown[0]), max(image.height, grown[1]))
    canvas.frame_count = frame_count
    if frame_count > 1 and getattr(image, "is_animated", False):
        canvas.loop = int(image.info.get("loop", 1 if canvas.source_format == "gif" else 0) or 0)
    canvas.icc_profile = image.info.get("icc_profile") or None


def _short(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:160]
