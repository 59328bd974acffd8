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

#: Where a search without a hint starts, per format: about the median q chosen at the default
#: target on the corpus (WebP 70-77, AVIF 64-67; BENCHMARKS.md, "q=auto"). AVIF needs fewer q
#: than WebP for one SSIMULACRA2 score because the quality map equalises luma SSIM, not it.
START: dict[str, int] = {"webp": 75, "avif": 66}
DEFAULT_START = 75
#: Score points per quality step near the targets that matter (WebP and AVIF, 9 photos at 640
#: and 1920 between q 40 and 95: 0.3-0.7); the first step without a bracket uses it.
SLOPE = 0.5
#: Stop once the lowest passing and the highest failing q are this close (about one point).
TOLERANCE = 2
#: ...or once a candidate passes by less than this many points: close enough that a lower q
#: would save little, and it makes a good hint (or START on an average image) one encode.
CLOSE = 1.0
#: The most candidates one search encodes, so a miss costs a bounded multiple of a fixed q.
MAX_ENCODES = 6
TOP = 100
BOTTOM = 1


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
    if failing >= BOTTOM and passing <= TOP:
        low, high = tried[failing][1], tried[passing][1]
        slope = (high - low) / (passing - failing)
        guess = failing + (target - low) / slope if slope > 0 else (failing + passing) / 2
        # Inside the bracket and off its ends, so every probe narrows it.
        return int(min(passing - 1, max(failing + 1, round(guess))))
    if passing <= TOP:  # only passes so far: step down
        gap = tried[passing][1] - target
        return max(BOTTOM, passing - max(TOLERANCE, round(gap / SLOPE)))
    gap = target - tried[failing][1]  # only failures so far: step up
    return min(TOP, failing + max(TOLERANCE, round(gap / SLOPE)))
