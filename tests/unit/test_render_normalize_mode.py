"""normalize_mode: every source mode becomes 8-bit L, LA, RGB, RGBA or CMYK, scaled, never clipped."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from app.render.normalize_mode import to_working_mode


def ramp16(mode: str) -> Image.Image:
    """A 256-wide 16-bit black-to-white ramp stored in `mode`."""
    values = (np.arange(256, dtype=np.uint32) * 257).reshape(1, 256).repeat(4, axis=0)
    if mode == "I":
        return Image.fromarray(values.astype(np.int32))
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2"}[mode]
    return Image.frombytes(mode, (256, 4), values.astype(dtype).tobytes())


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I"])
def test_16_bit_gray_is_scaled_to_8_bits_not_clipped(mode):
    source = ramp16(mode)
    assert source.mode == mode
    out = to_working_mode(source)
    row = np.asarray(out)[0].astype(int)
    assert out.mode == "L"
    assert row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 1


def test_8_bit_data_in_a_32_bit_image_stays_at_its_own_scale():
    dark = Image.new("I", (4, 4), 40)  # a stretch to its maximum would make it white
    assert to_working_mode(dark).getpixel((0, 0)) == 40


@pytest.mark.parametrize(
    ("image", "want"),
    [
        (Image.new("1", (4, 4), 1), "L"),
        (Image.new("L", (4, 4)), "L"),
        (Image.new("LA", (4, 4)), "LA"),
        (Image.new("La", (4, 4)), "LA"),
        (Image.new("RGBa", (4, 4)), "RGBA"),
        (Image.new("RGBX", (4, 4)), "RGB"),
        (Image.new("CMYK", (4, 4)), "CMYK"),
        (Image.new("YCbCr", (4, 4)), "RGB"),
        (Image.new("F", (4, 4), 0.5), "L"),
        (Image.new("P", (4, 4)), "RGB"),
        (Image.new("PA", (4, 4)), "RGBA"),
    ],
    ids=lambda value: value if isinstance(value, str) else value.mode,
)
def test_mode_maps_to_a_working_mode(image, want):
    assert to_working_mode(image).mode == want


def test_palette_with_transparency_keeps_it():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.info["transparency"] = 0
    assert to_working_mode(image).getpixel((0, 0))[3] == 0


def test_palette_with_an_rgba_palette_keeps_its_alpha():
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 0, 255, 0, 0, 128], rawmode="RGBA")
    assert to_working_mode(image).getpixel((0, 0)) == (255, 0, 0, 128)
