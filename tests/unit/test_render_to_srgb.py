"""to_srgb: pixels converted to sRGB through the source's ICC profile; a profile that cannot
apply is ignored (the pixels are taken as sRGB, as browsers do), never a crash."""

from __future__ import annotations

import gc
import importlib
import io
import struct
import sys

import numpy as np
import pytest
from PIL import Image, ImageCms

from app.render import RenderOptions, render
from app.render.to_srgb import MAX_ICC_PROFILE_BYTES, to_rgb
from tests.colour import delta_e_2000, srgb_lab, srgb_reference
from tests.upstream import corpus_dir

EDGE = corpus_dir() / "edge"
# The module, not the step function of the same name that app.render re-exports.
to_srgb = importlib.import_module("app.render.to_srgb")


def gray_profile(gamma: float) -> bytes:
    """A minimal ICC v2 gray display profile: description, D50 white and one gamma curve."""

    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    text = b"test gray gamma\0"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(text)) + text + b"\0" * 8 + b"\0" * 3 + b"\0" * 67
    wtpt = b"XYZ " + b"\0" * 4 + s15(0.9642) + s15(1.0) + s15(0.8249)
    ktrc = b"curv" + b"\0" * 4 + struct.pack(">I", 1) + struct.pack(">H", round(gamma * 256)) + b"\0\0"
    tags = [(b"desc", desc), (b"wtpt", wtpt), (b"kTRC", ktrc)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = struct.pack(">I", len(tags)), b""
    for signature, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (
        struct.pack(">I", size) + b"\0" * 4 + bytes([2, 0x10, 0, 0]) + b"mntrGRAYXYZ " + b"\0" * 12 + b"acsp"
        + b"\0" * 24 + b"\0" * 4 + s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48
    )  # fmt: skip
    return header + table + data


LINEAR_GRAY = gray_profile(1.0)


def test_the_handmade_gray_profile_is_a_valid_profile():
    profile = ImageCms.ImageCmsProfile(io.BytesIO(LINEAR_GRAY))
    assert profile.profile.xcolor_space.strip() == "GRAY"


def test_gray_profile_applies_to_a_gray_image():
    # Linear-light 50 % gray is sRGB ~188, far from the 128 an ignored profile would give.
    out = to_rgb(Image.new("L", (4, 4), 128), LINEAR_GRAY)
    assert out.mode == "RGB"
    assert all(abs(channel - 188) <= 3 for channel in out.getpixel((1, 1)))


def test_gray_profile_applies_to_gray_with_alpha_and_keeps_the_alpha():
    out = to_rgb(Image.new("LA", (4, 4), (128, 77)), LINEAR_GRAY)
    assert out.mode == "RGBA"
    r, g, b, a = out.getpixel((1, 1))
    assert a == 77 and all(abs(channel - 188) <= 3 for channel in (r, g, b))


@pytest.mark.parametrize(
    ("mode", "profile"),
    [
        ("L", ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()),
        ("RGB", LINEAR_GRAY),
        ("RGB", b"not an icc profile"),
        ("CMYK", LINEAR_GRAY),
    ],
    ids=["lab-profile-on-gray", "gray-profile-on-rgb", "garbage-profile", "gray-profile-on-cmyk"],
)
def test_a_profile_that_does_not_fit_is_ignored(mode, profile):
    out = to_rgb(Image.new(mode, (4, 4)), profile)
    assert out.mode == "RGB" and out.size == (4, 4)


@pytest.mark.parametrize("name", ["prophoto_profile.jpg", "adobergb_profile.png", "cmyk_profile.jpg"])
def test_wide_gamut_and_cmyk_sources_match_the_colour_managed_reference(name):
    data = (EDGE / name).read_bytes()
    with Image.open(io.BytesIO(data)) as source:
        source.load()
        managed = to_rgb(source, source.info["icc_profile"])
        ignored = to_rgb(source, None)
    reference = srgb_lab(np.asarray(srgb_reference(data, source.size)))
    managed_error = float(np.mean(delta_e_2000(reference, srgb_lab(np.asarray(managed)))))
    ignored_error = float(np.mean(delta_e_2000(reference, srgb_lab(np.asarray(ignored)))))
    assert managed_error < 0.5 < 3 < ignored_error


@pytest.mark.parametrize("mode", ["L", "LA"])
def test_gray_png_with_a_gray_profile_renders_through_it(mode):
    buffer = io.BytesIO()
    Image.new(mode, (16, 16), 128 if mode == "L" else (128, 200)).save(buffer, "PNG", icc_profile=LINEAR_GRAY)
    body = render(buffer.getvalue(), RenderOptions(width=0, quality=90, format="webp")).body
    with Image.open(io.BytesIO(body)) as out:
        pixel = out.convert("RGBA").getpixel((8, 8))
    assert all(abs(channel - 188) <= 4 for channel in pixel[:3])
    assert abs(pixel[3] - (255 if mode == "L" else 200)) <= 2


# -- hostile profiles: the cap and the digest-keyed cache -----------------------------------


def padded(profile: bytes, size: int) -> bytes:
    """A valid profile followed by junk up to `size` bytes; lcms reads it as the profile."""
    return profile + b"\0" * (size - len(profile))


def reachable(root: object, limit: int = 10_000) -> list[object]:
    """Every object reachable from root through gc referents (what root keeps alive)."""
    seen: dict[int, object] = {}
    todo = [root]
    while todo and len(seen) < limit:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, type) or type(obj).__name__ == "module":
            continue
        seen[id(obj)] = obj
        todo.extend(gc.get_referents(obj))
    return list(seen.values())


@pytest.fixture
def empty_transform_cache():
    to_srgb._transforms.clear()
    yield to_srgb._transforms
    to_srgb._transforms.clear()


@pytest.mark.parametrize(
    "profile",
    [padded(gray_profile(1.0), 900_000), b"junk" * 200_000],
    ids=["valid-900kB", "junk-800kB"],
)
def test_the_transform_cache_keeps_no_reference_to_the_profile_bytes(empty_transform_cache, profile):
    before = sys.getrefcount(profile)
    to_rgb(Image.new("L", (4, 4), 128), profile)
    assert sys.getrefcount(profile) == before
    assert len(empty_transform_cache.keys()) == 1
    kept = reachable(empty_transform_cache)
    assert not any(obj is profile for obj in kept)
    # What the cache pins is a digest per entry, not megabytes of someone's upload.
    assert max(len(obj) for obj in kept if isinstance(obj, bytes)) <= 64


def test_the_transform_cache_is_bounded_in_entries(empty_transform_cache):
    for n in range(to_srgb.TRANSFORM_CACHE_SIZE + 20):
        to_rgb(Image.new("RGB", (2, 2)), b"junk profile %d" % n)
    assert len(empty_transform_cache.keys()) == to_srgb.TRANSFORM_CACHE_SIZE


def test_a_cached_transform_is_reused_for_the_same_profile_bytes(empty_transform_cache):
    first = to_srgb.srgb_transform(gray_profile(1.0), "L")
    again = to_srgb.srgb_transform(bytes(bytearray(gray_profile(1.0))), "L")
    assert first is not None and again is first


def test_an_oversized_profile_is_ignored_without_being_parsed(empty_transform_cache, monkeypatch):
    def must_not_parse(*args, **kwargs):
        raise AssertionError("an oversized profile reached lcms")

    monkeypatch.setattr(ImageCms, "ImageCmsProfile", must_not_parse)
    out = to_rgb(Image.new("L", (4, 4), 128), b"junk" * (MAX_ICC_PROFILE_BYTES // 4 + 1))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (128, 128, 128)
    assert empty_transform_cache.keys() == []


@pytest.mark.parametrize(
    ("size", "expected"),
    [(MAX_ICC_PROFILE_BYTES, 188), (MAX_ICC_PROFILE_BYTES + 1, 128)],
    ids=["at-the-cap-applies", "over-the-cap-taken-as-srgb"],
)
def test_a_jpeg_with_a_profile_over_the_cap_renders_as_srgb(empty_transform_cache, size, expected):
    # The same valid linear-gray profile either side of the cap: applied, it lifts 128 to ~188.
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buffer, "JPEG", quality=95, icc_profile=padded(LINEAR_GRAY, size))
    body = render(buffer.getvalue(), RenderOptions(width=0, quality=90, format="webp")).body
    with Image.open(io.BytesIO(body)) as out:
        pixel = out.convert("RGB").getpixel((8, 8))
    assert all(abs(channel - expected) <= 4 for channel in pixel)
