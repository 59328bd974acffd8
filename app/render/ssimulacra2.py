"""SSIMULACRA2 of a distorted image against its reference, fast enough for the request path.

The arithmetic is compiled (`_ssimulacra2.c`, built by setup.py): the same formula, with the
same quirks, as the `ssimulacra2` package on PyPI (0.3.0, a NumPy/SciPy port of libjxl's tool)
that the shared quality bench (`quality.sh --ssimulacra2`) scores with, so the scores agree
with it within 0.01 (BENCHMARKS.md, "q=auto: the metric"), at about 7 ms a score for a 640 px
image. Where it could not be built (no C compiler or Python headers at install time), the NumPy
port `_ssimulacra2_numpy.py` scores the same at about 8x the CPU. This module is their face:
Pillow images in, a float out.
"""

from __future__ import annotations

import logging
from types import ModuleType

from PIL import Image

log = logging.getLogger("image_proxy.render")


def _implementation() -> ModuleType:
    try:
        from app.render import _ssimulacra2
    except ImportError:
        from app.render import _ssimulacra2_numpy

        log.warning(
            "q=auto scores with the NumPy SSIMULACRA2 (about 8x the CPU of the compiled one, "
            "which was not built: install gcc and the Python headers, then reinstall)"
        )
        return _ssimulacra2_numpy
    return _ssimulacra2


IMPLEMENTATION = _implementation()

#: Bytes per output pixel a q=auto search adds at its peak with the implementation in use
#: (app/render/estimate.py reserves it). Compiled: the prepared reference (48 over all scales)
#: and a candidate's working set (15); tracemalloc of whole q=auto renders at 0.27 and 2.2 MP
#: gave 58-69 above the same fixed-q render, plus about 10 for Pillow's decoded candidate and
#: its copies, which tracemalloc does not see. NumPy: 144 measured for the metric, same copies.
SEARCH_BYTES_PER_PIXEL = 80.0 if IMPLEMENTATION.__name__ == "app.render._ssimulacra2" else 155.0


def _rgb(image: Image.Image) -> bytes:
    if image.mode != "RGB":
        raise ValueError(f"ssimulacra2 scores RGB images, not {image.mode}")
    return image.tobytes()


class Reference:
    """A reference image prepared once, to score many candidates against (the q=auto search).
    Its memory: about 64 bytes per pixel for as long as it lives, plus 40 while scoring."""

    def __init__(self, image: Image.Image) -> None:
        self.size = image.size
        self._compiled = IMPLEMENTATION.Reference(_rgb(image), *image.size)

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
