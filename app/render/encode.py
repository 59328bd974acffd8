"""Encode the frames as WebP or AVIF, with no metadata, at the mapped quality.

Encoder settings are measured, not guessed (BENCHMARKS.md has the sweep); the AVIF quality
map makes q mean the same look in both formats (README, "Quality").
"""

from __future__ import annotations

import bisect
import io
from typing import Any

import pillow_avif  # noqa: F401  (registers the AVIF plugin with its aom/rav1e/svt encoders)

from app.errors import BadSource
from app.render.canvas import Canvas, Frame, RenderOptions

WEBP_METHOD = 4
AVIF_SPEED = 8
AVIF_CODEC = "aom"

#: (webp q, avif encoder quality) pairs with equal mean luma SSIM on the photo corpus;
#: linear in between. Measured with `make quality-map` (README, "Quality").
AVIF_QUALITY_MAP: tuple[tuple[int, int], ...] = (
    (1, 1),
    (50, 50),
    (65, 57),
    (75, 60),
    (85, 72),
    (95, 90),
    (100, 100),
)

CONTENT_TYPES = {"webp": "image/webp", "avif": "image/avif"}


def avif_quality(q: int) -> int:
    points = AVIF_QUALITY_MAP
    index = bisect.bisect_left([p[0] for p in points], q)
    if index < len(points) and points[index][0] == q:
        return points[index][1]
    (x0, y0), (x1, y1) = points[index - 1], points[index]
    return round(y0 + (y1 - y0) * (q - x0) / (x1 - x0))


def encoder_arguments(fmt: str, quality: int) -> dict[str, Any]:
    # Explicit empty metadata: both plugins otherwise copy EXIF/XMP/ICC from image.info.
    empty: dict[str, Any] = {"exif": b"", "xmp": b"", "icc_profile": b""}
    if fmt == "webp":
        return {"format": "WEBP", "quality": quality, "method": WEBP_METHOD, **empty}
    return {
        "format": "AVIF",
        "quality": avif_quality(quality),
        "speed": AVIF_SPEED,
        "codec": AVIF_CODEC,
        "subsampling": "4:2:0",
        **empty,
    }


def encode(canvas: Canvas, options: RenderOptions) -> None:
    frames: list[Frame] = list(canvas.frames)
    if not frames:
        raise BadSource("the source has no frames")
    first = frames[0].image
    arguments = encoder_arguments(options.format, options.quality)
    if canvas.animated and len(frames) > 1:
        arguments.update(
            save_all=True,
            append_images=[frame.image for frame in frames[1:]],
            duration=[frame.duration for frame in frames],
        )
        if options.format == "webp":
            arguments["loop"] = canvas.loop or 0
    buffer = io.BytesIO()
    try:
        first.save(buffer, **arguments)
    except (OSError, ValueError) as exc:
        raise BadSource(f"cannot encode this image as {options.format.upper()}: {exc}") from None
    canvas.body = buffer.getvalue()
    canvas.content_type = CONTENT_TYPES[options.format]
    canvas.has_alpha = first.mode == "RGBA"
    canvas.frame_count = len(frames)
