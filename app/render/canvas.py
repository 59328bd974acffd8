"""The values that flow through the render steps: options in, a Canvas worked on, Rendered out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import Image

from app.settings import INPUT_FORMATS


@dataclass(frozen=True)
class AutoQuality:
    """q=auto: the lowest quality whose output scores at least `target` (SSIMULACRA2)."""

    target: float

    def __str__(self) -> str:
        # Spelled into the cache key: a changed target is another key, never an old choice.
        return f"auto:{self.target:g}"


@dataclass(frozen=True)
class RenderOptions:
    width: int  # 0 = source width; never enlarged
    quality: int | AutoQuality  # 1..100, the same look in both formats; or chosen per image
    format: str  # "webp" | "avif"
    max_pixels: int = 50_000_000
    max_frames: int = 300
    input_formats: frozenset[str] = frozenset(INPUT_FORMATS)
    #: For q=auto: the quality chosen for another width or format of the same source, where
    #: the search starts (one or two encodes instead of a bisection). Ignored for a fixed q.
    quality_hint: int | None = None


@dataclass
class Frame:
    image: Image.Image
    duration: int = 0  # ms, as the source declares it


@dataclass
class Canvas:
    """Working state of one render. Steps fill it in order; `frames` is a lazy stream, so an
    animation holds one full-size source frame at a time, never all of them."""

    data: bytes
    source_format: str = ""  # sniffed: jpeg, png, gif, webp, avif, bmp, tiff
    image: Image.Image | None = None  # the opened source (header read, pixels not yet)
    source_size: tuple[int, int] = (0, 0)  # as stored
    frame_count: int = 1
    loop: int | None = None  # None: not animated; 0: forever; n: n loops
    orientation: int = 1  # EXIF orientation, 1..8
    target_size: tuple[int, int] = (0, 0)  # upright output size
    icc_profile: bytes | None = None
    frames: Iterator[Frame] = field(default_factory=lambda: iter(()))
    body: bytes = b""
    content_type: str = ""
    has_alpha: bool = False
    draft_box: tuple[float, float, float, float] | None = None  # source region in drafted pixels
    quality: int = 0  # the encoder quality used (q=auto: the one chosen)
    quality_score: float | None = None  # q=auto: the chosen output's SSIMULACRA2 score

    @property
    def animated(self) -> bool:
        return self.loop is not None

    @property
    def stored_target_size(self) -> tuple[int, int]:
        """target_size in the source's stored orientation (5..8 swap the axes)."""
        width, height = self.target_size
        return (height, width) if self.orientation in (5, 6, 7, 8) else (width, height)


@dataclass(frozen=True)
class Rendered:
    body: bytes
    content_type: str
    width: int
    height: int
    frames: int
    source_format: str
    source_width: int = 0  # upright, as a viewer shows the source
    source_height: int = 0
    quality: int = 0  # the quality encoded at: q, or what q=auto chose
    #: q=auto only: the chosen output's SSIMULACRA2 (for an animation, its first frame's).
    quality_score: float | None = None
