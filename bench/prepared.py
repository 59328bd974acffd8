"""The pipeline's frames as the encoder gets them: every step of app/render but the last."""

from __future__ import annotations

from PIL import Image

from app.render import STEPS, RenderOptions
from app.render.canvas import Canvas
from app.render.failures import as_proxy_errors


def prepared_frames(data: bytes, options: RenderOptions) -> list[Image.Image]:
    """The resized, upright, sRGB frames of `data` that encode() would receive."""
    canvas = Canvas(data=data)
    with as_proxy_errors():
        for step in STEPS[:-1]:
            step(canvas, options)
        return [frame.image for frame in canvas.frames]
