"""Convert colour to sRGB through the source's ICC profile, and give every frame RGB or RGBA.

Decision (docs/image-fidelity.md): pixels are converted to sRGB and no profile is carried. An
untagged WebP/AVIF is shown as sRGB by every browser, the output is a few KB smaller than
with a carried profile, and no viewer that ignores profiles can show it wrong.

Hostile profiles: one over MAX_ICC_PROFILE_BYTES is ignored unparsed, and the transform
cache is keyed by the profile's digest, so it never keeps a source's bytes alive.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict

from PIL import Image, ImageCms

from app.render.canvas import Canvas, RenderOptions
from app.render.frames import map_frames

_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))

#: Profiles larger than this are ignored, never parsed: the pixels are taken as sRGB (CMYK by
#: the naive formula), as browsers do with a profile they cannot use. Real profiles are a few
#: KB (sRGB, Display P3, Adobe RGB: 0.5-3 KB; camera and display profiles up to ~100 KB); the
#: largest commonly embedded ones are Adobe's CMYK press profiles with big LUTs, about 0.5-0.7
#: MB (U.S. Web Coated SWOP v2, Coated FOGRA39). 1 MiB keeps those and stops a request from
#: making lcms parse, and the cache from holding, tens of MB of junk.
MAX_ICC_PROFILE_BYTES = 1024 * 1024

#: Transforms kept per worker. Each holds lcms's precomputed pipeline, not the profile.
TRANSFORM_CACHE_SIZE = 64


class _TransformCache:
    """An LRU of sRGB transforms keyed by (sha256 of the profile, image mode).

    Keyed by a digest, never by the profile bytes: functools.lru_cache keeps its arguments
    in the key, so 64 distinct multi-MB profiles pinned hundreds of MB per worker. A digest
    is 32 bytes; the profile is dropped as soon as the transform is built. SHA-256, not
    SHA-1, so two crafted profiles cannot share one entry.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[bytes, str], ImageCms.ImageCmsTransform | None] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
        key = (hashlib.sha256(profile).digest(), mode)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        # Built outside the lock: two threads may build the same transform once each, which
        # costs less than making every render wait behind one slow lcms parse.
        transform = _build_transform(profile, mode)
        with self._lock:
            self._entries[key] = transform
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return transform

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def keys(self) -> list[tuple[bytes, str]]:
        with self._lock:
            return list(self._entries)


def _build_transform(profile: bytes, in_mode: str) -> ImageCms.ImageCmsTransform | None:
    """A transform from `profile` to sRGB, or None when the profile is sRGB already or
    cannot be used (then the pixels are taken as sRGB, which is what browsers do)."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        description = (ImageCms.getProfileDescription(source) or "").lower()
        if in_mode != "CMYK" and "srgb" in description:
            return None
        return ImageCms.buildTransform(source, _SRGB, in_mode, "RGB", renderingIntent=ImageCms.Intent.PERCEPTUAL)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


_transforms = _TransformCache(TRANSFORM_CACHE_SIZE)


def srgb_transform(profile: bytes | None, mode: str) -> ImageCms.ImageCmsTransform | None:
    if not profile or len(profile) > MAX_ICC_PROFILE_BYTES:
        return None
    return _transforms.get(profile, mode)


def to_rgb(image: Image.Image, profile: bytes | None) -> Image.Image:
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    colour = image.convert(image.mode[:-1]) if alpha is not None else image
    transform = srgb_transform(profile, colour.mode)
    if transform is not None:
        colour = ImageCms.applyTransform(colour, transform)
    elif colour.mode != "RGB":
        colour = colour.convert("RGB")  # CMYK without a profile: the naive formula
    if alpha is None:
        return colour
    colour.putalpha(alpha)
    return colour


def to_srgb(canvas: Canvas, options: RenderOptions) -> None:
    profile = canvas.icc_profile
    map_frames(canvas, lambda image: to_rgb(image, profile))
