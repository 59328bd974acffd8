"""Decode the source into a lazy stream of frames; JPEGs at a reduced DCT scale when downscaling."""

from __future__ import annotations

import math
from collections.abc import Iterator

from PIL import Image, ImageSequence

from app.errors import BadSource, SourceTooLarge
from app.render.canvas import Canvas, Frame, RenderOptions

#: JPEG draft decodes at 1/2, 1/4 or 1/8 scale, the smallest that leaves at least this many
#: times the target for LANCZOS, and the resize gets draft's box. Per output format, because
#: the draft's cost weighs differently (notes/perf.md, "Draft margin"; 9 photos, q75, w=640):
#: WebP's encode is cheap, so 1.25 (mean SSIM 0.9558 for 59 CPU ms/img at method 4, against
#: 0.9598 / 68 at 2 and 0.9530 / 52 at 1); AVIF's encode dominates its time, so 2 keeps the
#: quality that buys its bytes (the quality map is measured at 2).
DRAFT_MARGIN: dict[str, float] = {"webp": 1.25, "avif": 2.0}


def decode_reduced(canvas: Canvas, options: RenderOptions) -> None:
    image = canvas.image
    assert image is not None
    box = None
    if canvas.source_format == "jpeg" and canvas.stored_target_size != canvas.source_size:
        tw, th = canvas.stored_target_size
        margin = DRAFT_MARGIN[options.format]
        drafted = image.draft(None, (math.ceil(tw * margin), math.ceil(th * margin)))
        if drafted is not None:
            box = drafted[1]
    canvas.draft_box = box
    canvas.frames = _frames(canvas, image, options.max_pixels)


def _frames(canvas: Canvas, image: Image.Image, max_pixels: int) -> Iterator[Frame]:
    try:
        if not canvas.animated:
            image.load()
            yield Frame(image)
            return
        for index, frame in enumerate(ImageSequence.Iterator(image)):
            if index >= canvas.frame_count:
                break
            # A TIFF page or MPO picture has its own size, read by the seek; its pixels are
            # allocated only by copy(), so a page larger than the first is refused here.
            if frame.width * frame.height > max_pixels:
                raise SourceTooLarge(
                    f"frame {index + 1} is {frame.width}x{frame.height}, over the {max_pixels / 1e6:g} MP limit"
                )
            # The sequence reuses one Image; each frame is copied before the next seek.
            yield Frame(frame.copy(), duration=round(float(frame.info.get("duration", 0) or 0)))
    except (BadSource, MemoryError):
        raise  # render() words a MemoryError as "needs more memory", not as corrupt data
    except Exception as exc:  # truncated, corrupt, or a decoder refusing the data
        raise BadSource(f"the {canvas.source_format.upper()} data is corrupt or truncated: {_short(exc)}") from None


def _short(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:160]
