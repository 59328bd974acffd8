"""Bring every pixel mode to one the rest of the pipeline handles: L, RGB, RGBA or CMYK (8-bit).

16-bit and 32-bit modes are scaled, not clipped: Pillow's plain convert("L") from I;16
clips every value above 255 to white, which turns a 16-bit ramp into a white image.
"""

from __future__ import annotations

from PIL import Image

from app.render.canvas import Canvas, RenderOptions
from app.render.frames import map_frames

_KEEP = {"L", "RGB", "RGBA", "CMYK"}


def to_working_mode(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in _KEEP:
        return image
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info or image.palette.mode == "RGBA"
        return image.convert("RGBA" if has_alpha else "RGB")
    if mode in ("LA", "La", "RGBa", "RGBX"):
        return image.convert("RGBA" if mode != "RGBX" else "RGB")
    if mode == "1":
        return image.convert("L")
    if mode.startswith("I;16") or mode == "I":
        top = 65535 if mode.startswith("I;16") else max(1, image.getextrema()[1])  # type: ignore[index]
        return image.convert("I").point(lambda v: v * (255 / top)).convert("L")
    if mode == "F":
        low, high = image.getextrema()  # type: ignore[misc]
        span = (high - low) or 1.0
        return image.point(lambda v: (v - low) * (255 / span)).convert("L")
    return image.convert("RGB")  # YCbCr, LAB, HSV and the rest


def normalize_mode(canvas: Canvas, options: RenderOptions) -> None:
    map_frames(canvas, to_working_mode)
