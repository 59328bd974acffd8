"""The values that flow through the render steps: options in, a Canvas worked on, Rendered out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import Image

from app.settings import INPUT_FORMATS


@dataclass(frozen=True)
class RenderOptions:
    width: int  # 0 = source width; never enlarged
    quality: int  # 1..100, the same look in both formats
    format: str  # "webp" | "avif"
    max_pixels: int = 50_000_000
    max_frames: int = 300
    input_formats: frozenset[str] = frozenset(INPUT_FORMATS)


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
