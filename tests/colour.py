"""Colour-error measurement for the fidelity tests and the fidelity table: CIEDE2000 in numpy.

The reference is what a colour-managed viewer shows for the source: decoded, converted to sRGB
through its embedded ICC profile by LittleCMS (ImageCms), turned upright, resized with LANCZOS to
the output's size, and flattened onto white when it has alpha. The output is decoded and flattened
the same way, so the error covers everything the proxy did: colour conversion, resampling, codec.
"""

from __future__ import annotations

import io

import numpy as np
import pillow_avif  # noqa: F401  (AVIF decoding)
from PIL import Image, ImageCms, ImageOps

_SRGB = ImageCms.createProfile("sRGB")
# D65 white of sRGB, the white Lab is taken relative to (CIE 1931 2-degree observer).
_WHITE = np.array([0.95047, 1.0, 1.08883])
_RGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)


def flatten_on_white(image: Image.Image) -> Image.Image:
    """Any image -> RGB as it looks on a white page."""
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def srgb_lab(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 sRGB values 0..255 -> HxWx3 CIE L*a*b* (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def delta_e_2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference per pixel (Sharma, Wu, Dalal 2005), kL = kC = kH = 1."""
    l1, a1, b1 = (np.asarray(lab1, dtype=np.float64)[..., i] for i in range(3))
    l2, a2, b2 = (np.asarray(lab2, dtype=np.float64)[..., i] for i in range(3))
    c_mean = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_mean**7 / (c_mean**7 + 25.0**7)))
    a1p, a2p = a1 * (1 + g), a2 * (1 + g)
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    both = (c1p * c2p) != 0

    dl = l2 - l1
    dc = c2p - c1p
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(both, dh, 0)
    dhh = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))

    l_mean = (l1 + l2) / 2
    cp_mean = (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_mean = np.where(np.abs(h1p - h2p) <= 180, h_sum / 2, np.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2))
    h_mean = np.where(both, h_mean, h_sum)
    t = (
        1
        - 0.17 * np.cos(np.radians(h_mean - 30))
        + 0.24 * np.cos(np.radians(2 * h_mean))
        + 0.32 * np.cos(np.radians(3 * h_mean + 6))
        - 0.20 * np.cos(np.radians(4 * h_mean - 63))
    )
    d_theta = 30 * np.exp(-(((h_mean - 275) / 25) ** 2))
    r_c = 2 * np.sqrt(cp_mean**7 / (cp_mean**7 + 25.0**7))
    s_l = 1 + 0.015 * (l_mean - 50) ** 2 / np.sqrt(20 + (l_mean - 50) ** 2)
    s_c = 1 + 0.045 * cp_mean
    s_h = 1 + 0.015 * cp_mean * t
    r_t = -np.sin(np.radians(2 * d_theta)) * r_c
    return np.sqrt((dl / s_l) ** 2 + (dc / s_c) ** 2 + (dhh / s_h) ** 2 + r_t * (dc / s_c) * (dhh / s_h))


def srgb_reference(source: bytes, size: tuple[int, int]) -> Image.Image:
    """The source as a colour-managed viewer shows it, upright, at `size`, on white."""
    with Image.open(io.BytesIO(source)) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened)
        profile = opened.info.get("icc_profile")
    if image.mode.startswith("I;16") or image.mode == "I":
        image = Image.fromarray((np.asarray(image, dtype=np.float64) * (255 / 65535)).round().astype(np.uint8))
    alpha = image.convert("RGBA").getchannel("A") if image.mode in ("RGBA", "LA", "PA", "P") else None
    if profile:
        colour_mode = "CMYK" if image.mode == "CMYK" else ("L" if image.mode in ("L", "LA") else "RGB")
        source_profile = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        image = ImageCms.profileToProfile(image.convert(colour_mode), source_profile, _SRGB, outputMode="RGB")
    else:
        image = image.convert("RGB")
    if alpha is not None:
        image.putalpha(alpha)
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return flatten_on_white(image)


def mean_delta_e(source: bytes, output: bytes) -> float:
    """Mean CIEDE2000 between the colour-managed source and the decoded output, at the output's size."""
    with Image.open(io.BytesIO(output)) as decoded:
        decoded.load()
        out_rgb = flatten_on_white(decoded)
    ref_rgb = srgb_reference(source, out_rgb.size)
    return float(np.mean(delta_e_2000(srgb_lab(np.asarray(ref_rgb)), srgb_lab(np.asarray(out_rgb)))))
