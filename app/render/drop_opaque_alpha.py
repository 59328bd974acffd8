"""Drop an alpha channel that is opaque everywhere: the output looks the same and is smaller.

Only for still images; an animation keeps its frames' modes, since one frame's opaque
alpha says nothing of the next.
"""

from __future__ import annotations

from PIL import Image

from app.render.canvas import Canvas, RenderOptions
from app.render.frames import map_frames


def _drop(image: Image.Image) -> Image.Image:
    if image.mode == "RGBA" and image.getchannel("A").getextrema() == (255, 255):
        return image.convert("RGB")
    return image


def drop_opaque_alpha(canvas: Canvas, options: RenderOptions) -> None:
    if not canvas.animated:
        map_frames(canvas, _drop)
