"""Work out the output size once, before any pixel work: upright, aspect kept, never enlarged."""

from __future__ import annotations

from app.errors import BadSource
from app.render.canvas import Canvas, RenderOptions

ORIENTATION_TAG = 0x0112
#: WebP's hard limit per side; also used for AVIF so both formats answer the same.
MAX_OUTPUT_SIDE = 16383


def read_orientation(canvas: Canvas) -> int:
    assert canvas.image is not None
    try:
        value = int(canvas.image.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block is ignored, as browsers do
        return 1
    return value if 1 <= value <= 8 else 1


def target_size(upright: tuple[int, int], width: int) -> tuple[int, int]:
    src_w, src_h = upright
    out_w = src_w if width == 0 or width >= src_w else width
    out_h = max(1, round(src_h * out_w / src_w))
    scale = min(1.0, MAX_OUTPUT_SIDE / out_w, MAX_OUTPUT_SIDE / out_h)
    if scale < 1.0:
        out_w, out_h = max(1, int(out_w * scale)), max(1, int(out_h * scale))
    return out_w, out_h


def plan_geometry(canvas: Canvas, options: RenderOptions) -> None:
    canvas.orientation = read_orientation(canvas)
    width, height = canvas.source_size
    upright = (height, width) if canvas.orientation in (5, 6, 7, 8) else (width, height)
    if not all(upright):
        raise BadSource("source has no pixels")
    canvas.target_size = target_size(upright, options.width)
