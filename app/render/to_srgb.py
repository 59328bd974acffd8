"""Convert colour to sRGB through the source's ICC profile, and give every frame RGB or RGBA.

Decision (README, "Colour"): pixels are converted to sRGB and no profile is carried. An
untagged WebP/AVIF is shown as sRGB by every browser, the output is a few KB smaller than
with a carried profile, and no viewer that ignores profiles can show it wrong.
"""

from __future__ import annotations

import functools
import hashlib
import io

from PIL import Image, ImageCms

from app.render.canvas import Canvas, RenderOptions
from app.render.frames import map_frames

_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.lru_cache(maxsize=64)
def _transform(profile_digest: str, profile: bytes, in_mode: str) -> ImageCms.ImageCmsTransform | None:
    """A cached transform from `profile` to sRGB, or None when the profile is sRGB already
    or cannot be used (then the pixels are taken as sRGB, which is what browsers do)."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        description = (ImageCms.getProfileDescription(source) or "").lower()
        if in_mode != "CMYK" and "srgb" in description:
            return None
        return ImageCms.buildTransform(
            source, _SRGB, in_mode, "RGB", renderingIntent=ImageCms.Intent.PERCEPTUAL
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def srgb_transform(profile: bytes | None, mode: str) -> ImageCms.ImageCmsTransform | None:
    if not profile:
        return None
    return _transform(hashlib.sha1(profile).hexdigest(), profile, mode)


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
