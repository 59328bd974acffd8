"""Encode the frames as WebP or AVIF, with no metadata, at the mapped quality.

Encoder settings are measured, not guessed (BENCHMARKS.md has the sweep); the AVIF quality
map makes q mean the same look in both formats (docs/image-fidelity.md).
"""

from __future__ import annotations

import bisect
import io
import logging
import os
from dataclasses import dataclass
from typing import Any

import pillow_avif  # noqa: F401  (registers the AVIF plugin with its aom/rav1e/svt encoders)
from PIL import Image

from app.errors import BadSource
from app.render import auto_quality
from app.render.auto_quality import choose_quality
from app.render.canvas import AutoQuality, Canvas, Frame, RenderOptions

log = logging.getLogger("image_proxy.render")


@dataclass(frozen=True)
class EncoderSettings:
    """The encoder knobs that trade CPU for bytes; bench/encoder_sweep.py measures candidates."""

    # libwebp's method 2 skips the trellis/RD passes of 3 and 4: 0.55-0.7x the render CPU for
    # +4 % bytes at equal SSIM on small outputs (where draft's box gives SSIM to spare) but +10 %
    # at w=1920, so outputs over webp_small_pixels keep method 4 (BENCHMARKS.md, "Render speed and AVIF bytes").
    webp_method: int = 4
    webp_method_small: int = 2
    webp_small_pixels: int = 1_000_000
    avif_codec: str = "svt"  # pillow-avif-plugin names: aom, svt, rav1e
    avif_speed: int = 7
    avif_subsampling: str = "4:2:0"
    # Two halve one render's latency at no CPU cost; the plugin's default (the CPU count) would
    # oversubscribe a many-core machine that already runs one render per core.
    avif_max_threads: int | None = 2
    # Codec-specific options (libavif's "advanced" key/values) for avif_codec only: the small-image
    # fallback to aom gets none, since a key one codec knows makes the other refuse the encode.
    avif_advanced: tuple[tuple[str, str], ...] = ()


# SVT-AV1 prints ~25 lines of banner and config to stderr for every image it encodes, which
# would bury the access log; SVT_LOG=1 keeps its errors. Read at each encoder start.
os.environ.setdefault("SVT_LOG", "1")

#: SVT-AV1 speed 7 at 4:2:0 with tune 3 (SVT's still-image "IQ" tune): at equal quality 0.80-0.88x
#: the bytes of its default PSNR tune by SSIMULACRA2, the same by luma SSIM, at the same CPU; aom
#: at 4:4:4 needs 1.4-2x the CPU to do as well (BENCHMARKS.md, "Render speed and AVIF bytes").
ENCODER = EncoderSettings(avif_advanced=(("tune", "3"),))

#: SVT-AV1 4.1 (through libavif) hangs, never returning, on a side of 24 px or less when the
#: other side is long (17x300, 300x24), and refuses sides under 4 px, widths over 16384 and
#: heights over 8704; outside these bounds (with a margin) aom encodes instead.
SVT_MIN_SIDE = 64
SVT_MAX_WIDTH, SVT_MAX_HEIGHT = 16384, 8704

# Read by bench/quality_map.py's report header.
WEBP_METHOD, AVIF_SPEED, AVIF_CODEC = ENCODER.webp_method, ENCODER.avif_speed, ENCODER.avif_codec

#: (webp q, avif encoder quality) pairs with equal mean luma SSIM on the 9-photo corpus at
#: w=640 and w=1920 (`python -m bench.quality_map`, 2026-12-01 with SVT tune 3 and WebP method 2
#: up to 1 MP; BENCHMARKS.md); linear in between.
#: 50..95 are measured; 1 and 100 are the ends of the scale, not measurements.
AVIF_QUALITY_MAP: tuple[tuple[int, int], ...] = (
    (1, 1),
    (50, 41),
    (65, 46),
    (75, 50),
    (85, 60),
    (90, 73),
    (95, 83),
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


def encoder_arguments(
    fmt: str, quality: int, settings: EncoderSettings | None = None, pixels: int = 0
) -> dict[str, Any]:
    """Pillow save() arguments; `pixels` is the output's width x height (0: unknown, taken as large)."""
    settings = settings or ENCODER  # looked up per call, so a benchmark can swap ENCODER
    # Explicit empty metadata: both plugins otherwise copy EXIF/XMP/ICC from image.info.
    empty: dict[str, Any] = {"exif": b"", "xmp": b"", "icc_profile": b""}
    if fmt == "webp":
        method = settings.webp_method_small if small_output(pixels, settings) else settings.webp_method
        return {"format": "WEBP", "quality": quality, "method": method, **empty}
    threads = {} if settings.avif_max_threads is None else {"max_threads": settings.avif_max_threads}
    advanced = {"advanced": dict(settings.avif_advanced)} if settings.avif_advanced else {}
    return {
        "format": "AVIF",
        "quality": avif_quality(quality),
        "speed": settings.avif_speed,
        "codec": settings.avif_codec,
        "subsampling": settings.avif_subsampling,
        **threads,
        **advanced,
        **empty,
    }


def small_output(pixels: int, settings: EncoderSettings | None = None) -> bool:
    """An output WebP encodes with its faster method (0: size unknown, taken as large)."""
    return 0 < pixels <= (settings or ENCODER).webp_small_pixels


def start_quality(fmt: str, pixels: int) -> int:
    """Where a q=auto search starts for an output of `pixels`: a large WebP is encoded with
    method 4, whose score curves cross the target higher (auto_quality.START_LARGE)."""
    return (auto_quality.START if small_output(pixels) else auto_quality.START_LARGE)[fmt]


def still_arguments(fmt: str, quality: int, image: Image.Image) -> dict[str, Any]:
    """encoder_arguments for this image, with aom standing in where SVT-AV1 cannot encode."""
    arguments = encoder_arguments(fmt, quality, pixels=image.width * image.height)
    if arguments.get("codec") == "svt" and not svt_can_encode(*image.size):
        arguments["codec"] = "aom"
        arguments.pop("advanced", None)
    if arguments.get("codec") == "svt" and arguments["quality"] >= 100:
        # SVT's tune 3 at quality 100 shifts every colour (waterfall at 640 px: mean RGB
        # 99,116,135 decoded as 88,110,127, SSIMULACRA2 46.6 where q95 scores 87); its
        # default tune keeps them.
        arguments.pop("advanced", None)
    return arguments


def save(image: Image.Image, fmt: str, arguments: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    try:
        image.save(buffer, **arguments)
    except (OSError, ValueError) as exc:
        # The encoder's own words go to the log, never into the answer (docs/security.md).
        log.info("cannot encode as %s: %r", fmt, str(exc)[:200])
        raise BadSource(f"cannot encode this image as {fmt.upper()}") from None
    return buffer.getvalue()


def encode(canvas: Canvas, options: RenderOptions) -> None:
    frames: list[Frame] = list(canvas.frames)
    if not frames:
        raise BadSource("the source has no frames")
    first = frames[0].image
    animated = canvas.animated and len(frames) > 1
    body = b""
    if isinstance(options.quality, AutoQuality):
        choice = choose_quality(
            first,
            lambda q: save(first, options.format, still_arguments(options.format, q, first)),
            options.quality.target,
            options.quality_hint,
            level=avif_quality if options.format == "avif" else int,
            start=start_quality(options.format, first.width * first.height),
        )
        canvas.quality, canvas.quality_score = choice.quality, round(float(choice.score), 2)
        if not animated:
            body = choice.body  # the search's own candidate: no second encode
    else:
        canvas.quality = options.quality
    if not body:
        arguments = still_arguments(options.format, canvas.quality, first)
        if animated:
            arguments.update(
                save_all=True,
                append_images=[frame.image for frame in frames[1:]],
                duration=[frame.duration for frame in frames],
            )
            if options.format == "webp":
                arguments["loop"] = canvas.loop or 0
        body = save(first, options.format, arguments)
    canvas.has_alpha = first.mode == "RGBA"
    if options.format == "webp" and canvas.animated and canvas.has_alpha:
        body = flag_webp_alpha(body)
    canvas.body = body
    canvas.content_type = CONTENT_TYPES[options.format]
    canvas.frame_count = len(frames)


def svt_can_encode(width: int, height: int) -> bool:
    return min(width, height) >= SVT_MIN_SIDE and width <= SVT_MAX_WIDTH and height <= SVT_MAX_HEIGHT


_VP8X_ALPHA = 0x10


def flag_webp_alpha(body: bytes) -> bytes:
    """Set the VP8X alpha flag of an animated WebP whose frames are transparent.

    libwebp's animation encoder crops each frame to the rectangle that changed and sets the
    flag only when a cropped frame itself carries alpha. A frame that is opaque inside its
    crop but transparent around it leaves the flag unset, and decoders that trust the flag
    (Pillow, SDL_image) then show the transparent canvas as black. The flag only says
    "decode with alpha", which is true here, so setting it is always safe.
    """
    if body[12:16] != b"VP8X" or body[20] & _VP8X_ALPHA:
        return body
    return body[:20] + bytes([body[20] | _VP8X_ALPHA]) + body[21:]
