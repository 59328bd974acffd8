"""Keep alpha only where it shows: drop an alpha channel that is opaque everywhere.

A still is judged alone. An animation gets one decision for all its frames: RGBA for every frame
when any frame has a transparent pixel, else RGB for every frame. One mode for all frames matters
because the AVIF encoder takes the first frame's mode for the whole sequence (an RGB first frame
would silently drop a later frame's transparency), and an animation with no transparent pixel
(a GIF whose palette names a transparent index it never uses) would otherwise get an invented
alpha plane. The animation's frames are already at output size here, and encode holds them all
anyway, so collecting them costs no extra peak memory.
"""

from __future__ import annotations

from PIL import Image

from app.render.canvas import Canvas, RenderOptions
from app.render.frames import map_frames


def has_transparency(image: Image.Image) -> bool:
    return image.mode == "RGBA" and image.getchannel("A").getextrema()[0] < 255  # type: ignore[index]


def _drop(image: Image.Image) -> Image.Image:
    if image.mode == "RGBA" and not has_transparency(image):
        return image.convert("RGB")
    return image


def drop_opaque_alpha(canvas: Canvas, options: RenderOptions) -> None:
    if not canvas.animated:
        map_frames(canvas, _drop)
        return
    frames = list(canvas.frames)
    mode = "RGBA" if any(has_transparency(frame.image) for frame in frames) else "RGB"
    for frame in frames:
        if frame.image.mode != mode:
            frame.image = frame.image.convert(mode)
    canvas.frames = iter(frames)
