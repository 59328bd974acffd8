"""Apply a per-frame function lazily to a canvas's frame stream."""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from app.render.canvas import Canvas, Frame


def map_frames(canvas: Canvas, change: Callable[[Image.Image], Image.Image]) -> None:
    source = canvas.frames
    canvas.frames = (Frame(change(frame.image), frame.duration) for frame in source)
