"""render(data, options) -> Rendered: a pure function of bytes and options, no I/O.

The pipeline is STEPS, each a small function `step(canvas, options) -> None` in its own
file. Per-pixel steps wrap the canvas's lazy frame stream, so an animation is decoded,
resized and converted one frame at a time, and `encode` drains the stream. To add a step:
one file, one line in STEPS, one test.
"""

from __future__ import annotations

from collections.abc import Callable

from app.render.apply_orientation import apply_orientation
from app.render.canvas import AutoQuality, Canvas, Rendered, RenderOptions
from app.render.check_pixels import check_pixels
from app.render.decode import decode_reduced
from app.render.drop_opaque_alpha import drop_opaque_alpha
from app.render.encode import encode
from app.render.failures import as_proxy_errors
from app.render.normalize_mode import normalize_mode
from app.render.open_source import open_source
from app.render.plan_geometry import plan_geometry
from app.render.resize import resize
from app.render.sniff import sniff
from app.render.strip_metadata import strip_metadata
from app.render.to_srgb import to_srgb

Step = Callable[[Canvas, RenderOptions], None]

STEPS: tuple[Step, ...] = (
    sniff,
    open_source,
    check_pixels,
    plan_geometry,
    decode_reduced,
    normalize_mode,
    resize,
    apply_orientation,
    to_srgb,
    drop_opaque_alpha,
    strip_metadata,
    encode,
)

__all__ = ["STEPS", "AutoQuality", "RenderOptions", "Rendered", "render"]


def render(data: bytes, options: RenderOptions) -> Rendered:
    canvas = Canvas(data=data)
    try:
        with as_proxy_errors():
            for step in STEPS:
                step(canvas, options)
    finally:
        if canvas.image is not None:
            canvas.image.close()
    width, height = canvas.target_size
    source_width, source_height = canvas.source_size
    if canvas.orientation in (5, 6, 7, 8):
        source_width, source_height = source_height, source_width
    return Rendered(
        body=canvas.body,
        content_type=canvas.content_type,
        width=width,
        height=height,
        frames=canvas.frame_count,
        source_format=canvas.source_format,
        source_width=source_width,
        source_height=source_height,
        quality=canvas.quality,
        quality_score=canvas.quality_score,
    )

