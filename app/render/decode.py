"""Decode the source into a lazy stream of frames; JPEGs at a reduced DCT scale when downscaling."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from PIL import Image, ImageSequence

from app.errors import BadSource, SourceTooLarge
from app.render.canvas import Canvas, Frame, RenderOptions

log = logging.getLogger("image_proxy.render")

#: JPEG draft decodes at 1/2, 1/4 or 1/8 scale: the smallest scale whose image is still at
#: least `margin` times the target, and the resize gets draft's box. The margin depends on the
#: output format and on the scale (BENCHMARKS.md, "Render speed and AVIF bytes"; 9 photos, q75):
#: - WebP, whose encode is cheap: 1.25 at 1/4 and 1/8, where libjpeg's scaled IDCT is soft
#:   and LANCZOS must do part of the reduction (w=640: SSIM 0.9535 against 0.9509 at 1);
#:   1 at 1/2, whose IDCT is nearly exact (w=1920: SSIM -0.0005 for 0.9x the CPU, as a 10 MP
#:   source 1936 px wide is no longer decoded in full for a 1920 px output).
#: - AVIF, whose encode dominates its time: 2 at every scale, the quality that buys its bytes
#:   (the AVIF quality map is measured with it).
DRAFT_MARGIN: dict[str, dict[int, float]] = {
    "webp": {8: 1.25, 4: 1.25, 2: 1.0},
    "avif": {8: 2.0, 4: 2.0, 2: 2.0},
}


def draft_scale(source: tuple[int, int], target: tuple[int, int], margins: dict[int, float]) -> int:
    """The largest DCT scale divisor (8, 4, 2; 1 = no draft) leaving `margins[scale]` x the target."""
    for scale in (8, 4, 2):
        margin = margins[scale]
        if source[0] / scale >= target[0] * margin and source[1] / scale >= target[1] * margin:
            return scale
    return 1


def decode_reduced(canvas: Canvas, options: RenderOptions) -> None:
    image = canvas.image
    assert image is not None
    box = None
    if canvas.source_format == "jpeg" and canvas.stored_target_size != canvas.source_size:
        scale = draft_scale(canvas.source_size, canvas.stored_target_size, DRAFT_MARGIN[options.format])
        if scale > 1:
            # Pillow picks the largest scale <= source // requested, so asking for exactly the
            # scaled size selects `scale`.
            sw, sh = canvas.source_size
            drafted = image.draft(None, (sw // scale, sh // scale))
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
        log.info("%s data is corrupt or truncated: %r", canvas.source_format, _short(exc))
        raise BadSource(f"the {canvas.source_format.upper()} data is corrupt or truncated") from None


def _short(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:160]
