"""Refuse sources too big to decode safely, from header values alone, before any pixel exists."""

from __future__ import annotations

from app.errors import SourceTooLarge
from app.render.canvas import Canvas, RenderOptions


def check_pixels(canvas: Canvas, options: RenderOptions) -> None:
    width, height = canvas.source_size
    if width <= 0 or height <= 0:
        raise SourceTooLarge(f"source claims an empty {width}x{height} canvas")
    pixels = width * height
    if pixels > options.max_pixels:
        raise SourceTooLarge(
            f"source is {width}x{height} = {pixels / 1e6:.1f} MP, over the {options.max_pixels / 1e6:g} MP limit"
        )
    if canvas.frame_count > options.max_frames:
        raise SourceTooLarge(
            f"animation has {canvas.frame_count} frames, over the {options.max_frames}-frame limit"
        )
    # Every frame is decoded at full size, so an animation is judged by all its pixels,
    # as imgproxy does: a 300-frame 4000x4000 GIF is no smaller a job than its sum.
    if canvas.frame_count > 1 and pixels * canvas.frame_count > options.max_pixels:
        raise SourceTooLarge(
            f"animation is {canvas.frame_count} frames of {width}x{height}, "
            f"over the {options.max_pixels / 1e6:g} MP limit in total"
        )
