"""estimate(data, options) -> RenderCost: the memory and the CPU time a render will need, from the header.

Used to admit a render into the service's memory budget (app/memory.py) before any pixel is
decoded. It runs the pipeline's own header steps (sniff, open_source, check_pixels,
plan_geometry) and decode_reduced, which only picks the JPEG draft scale: nothing is decoded,
so the estimate costs what opening the header costs, and the figures it reads (draft size,
frame count, output size) are the ones the render will use.

The model, per render (all terms in bytes; the constants are measured by
`python -m bench.memory_model`, its table is in BENCHMARKS.md and docs/memory.md):

    peak = FIXED[format]                                   codec contexts, allocator slack
         + (DECODE[source format] + MODE_EXTRA[mode])      one decoded frame and its working
             x decoded pixels                              copies, after the JPEG draft
         + RESIZE_PASS x sqrt(decoded x output pixels)     resize's horizontal pass (out_w x in_h)
         + ENCODE[format] x output pixels                  the encoder's buffers for one frame
         + ACCUMULATED[format] x output pixels x frames    animations only
         + AUTO_QUALITY x output pixels                    q=auto only: the SSIMULACRA2 search

The work, per render, in work units (one unit: a second of one core of the reference machine,
the 2-core benchmark VM, rendering alone; app/image/admission.py learns how many seconds a unit
takes now):

    work = WORK_FIXED
         + frames x ( WORK_SOURCE x source pixels            reading the whole file (a JPEG's
                                                              entropy data at any draft scale)
                    + WORK_DECODE[source format] x decoded pixels   decode, resize, convert
                    + WORK_ENCODE[format] x output pixels )         the encoder

Frames are decoded and resized one at a time, but `drop_opaque_alpha` and `encode` hold every
resized frame of an animation (RGB(A), 4 bytes a pixel) and the animation encoders keep each
encoded frame, so an animation's output adds up while only one source frame is alive at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.render.canvas import AutoQuality, Canvas, RenderOptions
from app.render.check_pixels import check_pixels
from app.render.decode import decode_reduced
from app.render.failures import as_proxy_errors
from app.render.open_source import open_source
from app.render.plan_geometry import plan_geometry
from app.render.sniff import sniff
from app.render.ssimulacra2 import SEARCH_BYTES_PER_PIXEL

MB = 1024 * 1024

#: Bytes a render of a ~1 MP source needs beyond its per-pixel terms (Python objects, codec
#: contexts: SVT-AV1 sets up ~12 MB of its own), per output format.
FIXED: dict[str, int] = {"webp": 12 * MB, "avif": 26 * MB}
#: What a miss reserves before its fetch, known from the request alone: a small miss's whole
#: need, body and render (a w=320 WebP of the shared photos: body up to 3 MB + peak 14-18 MB by
#: this model; w=640 AVIF mostly 35-47 MB), so most small misses never grow. Growing is where
#: requests that already hold bytes keep each other out beside a big render that holds most of
#: the budget: with the render's fixed part reserved first and the body on top, three
#: thumbnails beside a 1.3 GB render held all the 73 MB left and none could grow by the few
#: MB its body needed, until the big one ended 12 s later.
MISS_START: dict[str, int] = {"webp": 24 * MB, "avif": 48 * MB}

#: Bytes per decoded source pixel, per decoder, including the full-size working copies the
#: pipeline makes for an 8-bit RGB source. GIF, AVIF, BMP and TIFF stills were not measured
#: and take the largest figure.
DECODE: dict[str, float] = {
    "jpeg": 4.0,
    "png": 4.0,
    "webp": 16.5,  # libwebp decodes into its own buffer, which Pillow then copies
    "gif": 16.5,
    "avif": 16.5,
    "bmp": 16.5,
    "tiff": 16.5,
}

#: Extra bytes per decoded pixel for source modes that are converted before the working mode
#: (Pillow stores RGB, RGBA, CMYK, I and F at 4 bytes a pixel, L and P at 1, I;16 at 2):
#: palette -> RGB(A) keeps the 1-byte source next to a 4-byte copy; 16/32-bit greys go through
#: a 32-bit image twice; CMYK and grey get an RGB copy in to_srgb. From Pillow's storage
#: layout, checked by the palette and grey rows of the measurement.
MODE_EXTRA: dict[str, float] = {
    "P": 4.0,
    "PA": 4.0,
    "1": 4.0,
    "L": 4.0,
    "LA": 4.0,
    "CMYK": 4.0,
    "I;16": 8.0,
    "I;16B": 8.0,
    "I;16L": 8.0,
    "I": 8.0,
    "F": 8.0,
}
NO_EXTRA = frozenset({"RGB", "RGBA", "RGBX"})
DEFAULT_MODE_EXTRA = 4.0  # YCbCr, LAB, HSV and anything rarer: one RGB copy

#: Pillow resamples horizontally first, into an out_w x in_h image of 4 bytes a pixel.
RESIZE_PASS = 4.0

#: Bytes per output pixel of one frame for the encoder: its picture, analysis and bitstream
#: buffers, and the plugin's copy of the pixels.
ENCODE: dict[str, float] = {"webp": 21.5, "avif": 24.5}

#: Bytes per output pixel that a q=auto search adds: the metric's own figure for the
#: implementation this machine runs (compiled 80, its NumPy fallback 155).
AUTO_QUALITY = SEARCH_BYTES_PER_PIXEL

#: Bytes per output pixel per frame that an animation holds until the encoder is done: the
#: resized frames (4 bytes a pixel) and the encoded frames kept by the animation encoder.
ACCUMULATED: dict[str, float] = {"webp": 7.5, "avif": 19.0}


#: Work units (reference seconds) per megapixel, fitted by least relative error to 24 renders
#: (noisy 2 MP and 12 MP JPEGs and a 2 MP PNG, w=320/640/1600/0, WebP and AVIF, each the best
#: of two, alone on the 2-core VM): the model gives 0.8-1.7x the measured time of each. AVIF (SVT-AV1,
#: speed 7) costs about 1.2x WebP per output pixel here, more at full size.
WORK_FIXED = 0.01
WORK_SOURCE = 0.003 / 1e6
WORK_DECODE: dict[str, float] = {
    "jpeg": 0.027 / 1e6,  # at the draft scale: the decoded pixels are a quarter or less
    "png": 0.045 / 1e6,  # zlib, never reduced
    "webp": 0.045 / 1e6,  # not measured: PNG's figure
    "gif": 0.045 / 1e6,
    "avif": 0.045 / 1e6,
    "bmp": 0.045 / 1e6,
    "tiff": 0.045 / 1e6,
}
WORK_ENCODE: dict[str, float] = {"webp": 0.09 / 1e6, "avif": 0.11 / 1e6}


@dataclass(frozen=True)
class RenderShape:
    """What a render's memory depends on, read from the header as the pipeline reads it."""

    source_format: str
    mode: str
    decoded_pixels: int  # one frame, at the JPEG draft scale the render will use
    output_pixels: int  # one frame
    frames: int
    animated: bool
    source_pixels: int = 0  # one frame, before any draft


@dataclass(frozen=True)
class RenderCost:
    """What admission needs of a render before it starts."""

    peak_bytes: int  # memory at its peak, above an idle worker (app/memory.py)
    work_units: float  # CPU time in reference seconds (app/image/admission.py)


def render_shape(data: bytes, options: RenderOptions) -> RenderShape:
    """Run the header steps of the pipeline; raises the same 400s render() would for them."""
    canvas = Canvas(data=data)
    try:
        with as_proxy_errors():
            for step in (sniff, open_source, check_pixels, plan_geometry, decode_reduced):
                step(canvas, options)
        image = canvas.image
        assert image is not None  # open_source returned early only for a GIF check_pixels refused
        width, height = canvas.source_size
        if canvas.draft_box is not None:  # draft() has set the reduced decode size
            width, height = image.size
        out_w, out_h = canvas.target_size
        return RenderShape(
            source_format=canvas.source_format,
            mode=image.mode,
            decoded_pixels=width * height,
            output_pixels=out_w * out_h,
            frames=canvas.frame_count if canvas.animated else 1,
            animated=canvas.animated and canvas.frame_count > 1,
            source_pixels=canvas.source_size[0] * canvas.source_size[1],
        )
    finally:
        canvas.frames = iter(())  # the lazy frame generator was never started
        if canvas.image is not None:
            canvas.image.close()


def mode_extra(mode: str) -> float:
    return 0.0 if mode in NO_EXTRA else MODE_EXTRA.get(mode, DEFAULT_MODE_EXTRA)


def peak_of(shape: RenderShape, fmt: str, auto_quality: bool = False) -> int:
    decoded, output = shape.decoded_pixels, shape.output_pixels
    total = FIXED[fmt] + (DECODE[shape.source_format] + mode_extra(shape.mode)) * decoded + ENCODE[fmt] * output
    if auto_quality:  # the search scores one frame, the first, at output size
        total += AUTO_QUALITY * output
    if output != decoded:
        total += RESIZE_PASS * math.sqrt(decoded * output)
    if shape.animated:
        total += ACCUMULATED[fmt] * output * shape.frames
    return int(total)


#: How many times a fixed-q encode's work a q=auto search costs (the whole render measured 1.9-3.7x
#: a fixed-q one at the median, in-process on the q=auto corpus; the encode term carries it).
AUTO_QUALITY_WORK = 4.0


def work_of(shape: RenderShape, fmt: str, auto_quality: bool = False) -> float:
    encode = WORK_ENCODE[fmt] * shape.output_pixels
    if auto_quality:
        # The search encodes and scores a few candidates of the first frame (BENCHMARKS.md,
        # q=auto: 1-2 encodes at the median).
        encode *= AUTO_QUALITY_WORK
    per_frame = (
        WORK_SOURCE * (shape.source_pixels or shape.decoded_pixels)
        + WORK_DECODE[shape.source_format] * shape.decoded_pixels
        + encode
    )
    return WORK_FIXED + shape.frames * per_frame


def estimate(data: bytes, options: RenderOptions) -> RenderCost:
    """The memory and work of a render of `data` with `options`, from one read of the header;
    raises the same 400s render() would for the header."""
    shape = render_shape(data, options)
    auto = isinstance(options.quality, AutoQuality)
    return RenderCost(peak_of(shape, options.format, auto_quality=auto), work_of(shape, options.format, auto))


def estimate_peak(data: bytes, options: RenderOptions) -> int:
    """Bytes of memory a render of `data` with `options` needs at its peak, above an idle worker."""
    return estimate(data, options).peak_bytes
