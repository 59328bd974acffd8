"""Drop EXIF, XMP, ICC and comments, so no camera, owner or GPS data reaches the output."""

from __future__ import annotations

from PIL import Image

from app.render.canvas import Canvas, RenderOptions
from app.render.frames import map_frames


def _strip(image: Image.Image) -> Image.Image:
    image.info.clear()
    return image


def strip_metadata(canvas: Canvas, options: RenderOptions) -> None:
    canvas.icc_profile = None
    map_frames(canvas, _strip)
