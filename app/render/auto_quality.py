"""q=auto: the lowest quality whose output reaches an SSIMULACRA2 target.

The candidate is judged against the resized image before encoding (the frame encode()
receives), both flattened onto white as a page shows them (alpha itself is not scored; WebP
keeps it lossless and AVIF at the same quality), with the compiled SSIMULACRA2 of
app/render/ssimulacra2.py. Scores rise with q, closely enough to search by interpolation:

- the first candidate is the hint (the quality found for another width or format of the same
  source) or START for the format; each next one interpolates between the closest passing and failing
  qualities, or steps by the score gap over a typical slope while only one side is known;
- the search stops when the passing and failing qualities are within TOLERANCE of each
  other, when a candidate passes by less than CLOSE points, or after MAX_ENCODES encodes;
  the answer is the lowest passing quality seen;
- a target that even q=100 misses gets q=100 (the top quality), as SPEC §11 asks.

An animation is searched on its first frame alone, encoded as a still, and every frame is then
encoded at the quality chosen: one frame's search instead of N frames', documented in
docs/image-fidelity.md. Pure: no I/O, only CPU.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from app.render.ssimulacra2 import Reference

#: Where a search without a hint starts, per format: near the median q chosen at the default
#: target on the corpus (BENCHMARKS.md, "q=auto": WebP 70-77, AVIF 64-68), picked with the other
#: constants below by replaying searches over every corpus image's score curve.
START: dict[str, int] = {"webp": 72, "avif": 70}
#: ...and for outputs over ENCODER.webp_small_pixels, which WebP encodes with method 4 instead of
#: 2: its curves cross the target higher (median q 76-80 at w=1920 against 72 at 640).
START_LARGE: dict[str, int] = {"webp": 78, "avif": 70}
DEFAULT_START = 72
#: Score points per quality step, by quality band: the median slope of the SSIMULACRA2 curve
#: where it crosses scores 60-80, over the corpus's WebP and AVIF curves at 640 and 1920 (635
#: segments of 5 q). Flattest in the middle, where most images find their target.
SLOPES: tuple[tuple[int, float], ...] = ((20, 0.7), (40, 0.55), (80, 0.35), (1000, 0.75))
#: A step from one side aims this far past the target, so the next candidate tends to pass and
#: end the search instead of landing just below it.
MARGIN = 1.0
#: Stop once the lowest passing and the highest failing q are this close...
TOLERANCE = 4
#: ...or once a candidate passes by less than this many points. Wider than a point on purpose:
#: every extra candidate costs an encode and a score, and a few q more cost a few % of bytes
#: (on the corpus: 1.04-1.08x the bytes of the lowest passing q, for 2 candidates at the median
#: instead of 3; BENCHMARKS.md).
CLOSE = 4.0
#: The most candidates one search encodes, so a miss costs a bounded multiple of a fixed q.
MAX_ENCODES = 6
TOP = 100
BOTTOM = 1


def slope_near(q: float) -> float:
    return next(slope for below, slope in SLOPES if q < below)


@dataclass(frozen=True)
class Choice:
    quality: int
    body: bytes  # the encoded candidate at `quality`
    score: float
    encodes: int  # candidates encoded and scored


def flatten(image: Image.Image) -> Image.Image:
    """RGB as a page shows the image: transparent pixels over white."""
    if image.mode in ("LA", "PA", "P", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.getchannel("A"))
        return white
    return image if image.mode == "RGB" else image.convert("RGB")


def choose_quality(
    frame: Image.Image, encode: Callable[[int], bytes], target: float, hint: int | None = None,
    level: Callable[[int], int] = int, start: int = DEFAULT_START,
) -> Choice:
    """Search the quality for one frame; `encode(q)` gives the encoded bytes at q. `level(q)`
    is the encoder's own quality for q: AVIF's map gives several q one encoder quality, and
    those share one encode (Choice.encodes counts encodes, not probes)."""
    reference = Reference(flatten(frame))
    if not reference.scales:
        # A side under 8 px: the metric has no scale to judge it by and would call every q
        # perfect, so the search would walk down to q 1. The start quality, one encode.
        return Choice(start, encode(start), 100.0, 1)
    done: dict[int, tuple[bytes, float]] = {}

    def probe(q: int) -> tuple[bytes, float]:
        key = level(q)
        if key not in done:
            body = encode(q)
            with Image.open(io.BytesIO(body)) as decoded:
                done[key] = body, reference.score(flatten(decoded))
        return done[key]

    choice = search(probe, target, hint, start=start)
    return Choice(choice.quality, choice.body, choice.score, len(done))


def search(
    probe: Callable[[int], tuple[bytes, float]], target: float, hint: int | None = None,
    *, start: int = DEFAULT_START, max_encodes: int = MAX_ENCODES,
) -> Choice:
    """The lowest q in BOTTOM..TOP whose probe scores >= target, within TOLERANCE, in at most
    `max_encodes` probes; TOP when none reaches it. `probe(q)` -> (bytes, score)."""
    tried: dict[int, tuple[bytes, float]] = {}
    passing, failing = TOP + 1, BOTTOM - 1  # lowest q known to pass, highest known to fail
    q = min(TOP, max(BOTTOM, hint if hint is not None else start))
    # One probe is kept back for TOP, in case nothing passes before the budget runs out.
    while len(tried) < max_encodes - 1:
        tried[q] = probe(q)
        if tried[q][1] >= target:
            passing = q
        else:
            failing = q
        if passing - failing <= TOLERANCE or failing == TOP or target <= tried[q][1] < target + CLOSE:
            break
        q = _next(tried, passing, failing, target)
    if passing > TOP:
        passing = TOP
        if TOP not in tried:
            tried[TOP] = probe(TOP)
    body, score = tried[passing]
    return Choice(passing, body, score, len(tried))


def _next(tried: dict[int, tuple[bytes, float]], passing: int, failing: int, target: float) -> int:
    aim = target + MARGIN
    if failing >= BOTTOM and passing <= TOP:
        low, high = tried[failing][1], tried[passing][1]
        slope = (high - low) / (passing - failing)
        guess = failing + (aim - low) / slope if slope > 0 else (failing + passing) / 2
        # Inside the bracket and off its ends, so every probe narrows it.
        return int(min(passing - 1, max(failing + 1, round(guess))))
    if passing <= TOP:  # only passes so far: step down, by the slope half a typical step below
        gap = tried[passing][1] - aim
        return max(BOTTOM, passing - max(TOLERANCE, round(gap / slope_near(passing - 8))))
    gap = aim - tried[failing][1]  # only failures so far: step up
    return min(TOP, failing + max(TOLERANCE, round(gap / slope_near(failing + 8))))
