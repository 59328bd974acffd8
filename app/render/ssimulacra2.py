"""SSIMULACRA2 of a distorted image against its reference, fast enough for the request path.

The arithmetic is compiled (`_ssimulacra2.c`, built by setup.py): the same formula, with the
same quirks, as the `ssimulacra2` package on PyPI (0.3.0, a NumPy/SciPy port of libjxl's tool)
that the shared quality bench (`quality.sh --ssimulacra2`) scores with, so the scores agree
with it within 0.01 (BENCHMARKS.md, "q=auto: the metric"), at a few milliseconds a score for a
640 px image. This module is its face: Pillow images in, a float out.
"""

from __future__ import annotations

from PIL import Image

from app.render import _ssimulacra2


def _rgb(image: Image.Image) -> bytes:
    if image.mode != "RGB":
        raise ValueError(f"ssimulacra2 scores RGB images, not {image.mode}")
    return image.tobytes()


class Reference:
    """A reference image prepared once, to score many candidates against (the q=auto search).
    Its memory: about 64 bytes per pixel for as long as it lives, plus 40 while scoring."""

    def __init__(self, image: Image.Image) -> None:
        self.size = image.size
        self._compiled = _ssimulacra2.Reference(_rgb(image), *image.size)

    @property
    def scales(self) -> int:
        """Scales of at least 8x8 pixels; 0: too small to judge (every candidate scores 100)."""
        return int(self._compiled.scales)

    def score(self, distorted: Image.Image) -> float:
        """SSIMULACRA2 of an RGB candidate of the reference's size; 100 = identical."""
        if distorted.size != self.size:
            raise ValueError(f"sizes differ: {self.size} vs {distorted.size}")
        return float(self._compiled.score(_rgb(distorted)))


def ssimulacra2(reference: Image.Image, distorted: Image.Image) -> float:
    """SSIMULACRA2 of two RGB images of one size."""
    return Reference(reference).score(distorted)
