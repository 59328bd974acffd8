"""Bring every pixel mode to one the rest of the pipeline handles: L, LA, RGB, RGBA or CMYK (8-bit).

16-bit and 32-bit modes are scaled, not clipped: Pillow's plain convert("L") from I;16
clips every value above 255 to white, which turns a 16-bit ramp into a white image.
"""

from __future__ import annotations

from PIL import Image

from app.render.canvas import Canvas, RenderOptions
from app.render.frames import map_frames

# LA stays gray so a gray ICC profile still applies to it in to_srgb.
_KEEP = {"L", "LA", "RGB", "RGBA", "CMYK"}


def to_working_mode(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in _KEEP:
        return image
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info or image.palette.mode == "RGBA"
        return image.convert("RGBA" if has_alpha else "RGB")
    if mode in ("La", "RGBa", "RGBX"):
        return image.convert({"La": "LA", "RGBa": "RGBA", "RGBX": "RGB"}[mode])
    if mode == "1":
        return image.convert("L")
    if mode.startswith("I;16") or mode == "I":
        top = 65535 if mode.startswith("I;16") else _integer_range(image)
        return image.convert("I").point(lambda v: v * (255 / top)).convert("L")
    if mode == "F":
        low, high = image.getextrema()  # type: ignore[misc]
        span = (high - low) or 1.0
        return image.point(lambda v: (v - low) * (255 / span)).convert("L")
    return image.convert("RGB")  # YCbCr, LAB, HSV and the rest


def _integer_range(image: Image.Image) -> int:
    """The white point of a 32-bit integer image: 8-bit or 16-bit data kept at its own scale,
    so a dark image stays dark; wider data is stretched to its maximum."""
    high = image.getextrema()[1]  # type: ignore[index]
    return 255 if high <= 255 else 65535 if high <= 65535 else int(high)


def normalize_mode(canvas: Canvas, options: RenderOptions) -> None:
    map_frames(canvas, to_working_mode)
