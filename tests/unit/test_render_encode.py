"""encode: the AVIF quality map, metadata-free encoder arguments, the animated-WebP alpha flag."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from app.render.encode import AVIF_QUALITY_MAP, avif_quality, encoder_arguments, flag_webp_alpha, svt_can_encode


def test_quality_map_covers_1_to_100_and_is_monotonic():
    webp = [p[0] for p in AVIF_QUALITY_MAP]
    avif = [p[1] for p in AVIF_QUALITY_MAP]
    assert webp[0] == 1 and webp[-1] == 100
    assert webp == sorted(set(webp)) and avif == sorted(avif)
    mapped = [avif_quality(q) for q in range(1, 101)]
    assert mapped == sorted(mapped) and all(1 <= v <= 100 for v in mapped)


@pytest.mark.parametrize("q", [50, 75, 90])
def test_measured_points_are_in_the_table(q):
    assert avif_quality(q) == dict(AVIF_QUALITY_MAP)[q]


def test_between_points_the_map_is_linear():
    (x0, y0), (x1, y1) = AVIF_QUALITY_MAP[1], AVIF_QUALITY_MAP[2]
    middle = (x0 + x1) // 2
    assert avif_quality(middle) == round(y0 + (y1 - y0) * (middle - x0) / (x1 - x0))


@pytest.mark.parametrize("fmt", ["webp", "avif"])
def test_encoder_arguments_carry_empty_metadata(fmt):
    arguments = encoder_arguments(fmt, 75)
    assert arguments["exif"] == arguments["xmp"] == arguments["icc_profile"] == b""


def _animated_webp(alpha: int) -> bytes:
    frames = [Image.new("RGBA", (8, 8), (255, 0, 0, alpha)), Image.new("RGBA", (8, 8), (0, 255, 0, alpha))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], duration=[10, 10])
    return buffer.getvalue()


def test_alpha_flag_is_set_and_nothing_else_changes():
    body = _animated_webp(255)  # opaque frames: libwebp leaves the flag unset
    assert not body[20] & 0x10
    flagged = flag_webp_alpha(body)
    assert flagged[20] == body[20] | 0x10 and flagged[:20] == body[:20] and flagged[21:] == body[21:]
    assert Image.open(io.BytesIO(flagged)).mode == "RGBA"


def test_alpha_flag_already_set_or_no_vp8x_leaves_the_bytes_alone():
    with_alpha = _animated_webp(100)
    assert flag_webp_alpha(with_alpha) == with_alpha
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "WEBP")
    assert flag_webp_alpha(buffer.getvalue()) == buffer.getvalue()


# -- SVT-AV1's size limits: aom takes the sizes SVT 4.1 hangs on or refuses -----------------


@pytest.mark.parametrize(
    ("size", "svt"),
    [((640, 427), True), ((64, 64), True), ((63, 500), False), ((20, 1000), False), ((1000, 17), False),
     ((16385, 100), False), ((100, 8705), False), ((16384, 8704), True)],
    ids=lambda v: str(v),
)
def test_svt_is_used_only_for_sizes_it_can_encode(size, svt):
    assert svt_can_encode(*size) is svt


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [(20, 1000), (1000, 20), (17, 300), (300, 24), (5000, 17)], ids=str)
def test_thin_images_encode_to_avif_without_hanging(size):
    from app.render import RenderOptions, render

    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    out = render(buffer.getvalue(), RenderOptions(width=0, quality=75, format="avif"))
    assert (out.width, out.height) == size
    assert Image.open(io.BytesIO(out.body)).size == size


# -- encoder choices by output size and codec (issue 16) -----------------------------------


def test_webp_method_is_the_cheap_one_up_to_the_small_size_and_the_thorough_one_above():
    from app.render.encode import ENCODER

    small = encoder_arguments("webp", 75, pixels=640 * 427)
    large = encoder_arguments("webp", 75, pixels=1920 * 1280)
    unknown = encoder_arguments("webp", 75)
    assert small["method"] == ENCODER.webp_method_small != ENCODER.webp_method
    assert large["method"] == unknown["method"] == ENCODER.webp_method


def test_avif_codec_options_reach_the_encoder_and_change_its_output():
    from app.render.encode import EncoderSettings

    tuned = EncoderSettings(avif_advanced=(("tune", "3"),))
    arguments = encoder_arguments("avif", 75, tuned)
    assert arguments["advanced"] == {"tune": "3"}
    image = Image.radial_gradient("L").convert("RGB").resize((128, 128))
    bodies = []
    for settings in (tuned, EncoderSettings()):
        buffer = io.BytesIO()
        image.save(buffer, **encoder_arguments("avif", 75, settings))
        bodies.append(buffer.getvalue())
    assert bodies[0] != bodies[1]


def test_small_image_fallback_to_aom_drops_the_svt_only_options():
    from app.render import RenderOptions, render
    from app.render.encode import ENCODER

    assert ENCODER.avif_codec == "svt" and ENCODER.avif_advanced  # else this test proves nothing
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, "PNG")
    rendered = render(buffer.getvalue(), RenderOptions(width=0, quality=75, format="avif"))
    assert Image.open(io.BytesIO(rendered.body)).size == (40, 30)


def test_avif_at_q100_keeps_the_colours():
    """SVT-AV1's tune 3 at quality 100 shifted every colour (mean RGB 99,116,135 came back as
    88,110,127); q=100 is also what q=auto falls back to, so it must look right."""
    from app.render import RenderOptions, render

    gradient = Image.linear_gradient("L").resize((320, 200))
    source = Image.merge("RGB", (gradient, gradient.rotate(90).resize((320, 200)), Image.new("L", (320, 200), 140)))
    buffer = io.BytesIO()
    source.save(buffer, "PNG")
    rendered = render(buffer.getvalue(), RenderOptions(width=0, quality=100, format="avif"))
    with Image.open(io.BytesIO(rendered.body)) as out:
        mean_out = out.convert("RGB").resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
    mean_in = source.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
    assert all(abs(a - b) <= 2 for a, b in zip(mean_in, mean_out, strict=True)), (mean_in, mean_out)
