"""decode: the JPEG draft scale chosen per image and output format."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from app.render import RenderOptions, render
from app.render.decode import DRAFT_MARGIN, draft_scale

WEBP, AVIF = DRAFT_MARGIN["webp"], DRAFT_MARGIN["avif"]


@pytest.mark.parametrize(
    ("source", "target", "margins", "scale"),
    [
        ((3872, 2592), (640, 428), WEBP, 4),  # 968 px at 1/4: 1.5x the target
        ((2725, 2225), (640, 523), WEBP, 2),  # 681 px at 1/4 is under 1.25x: one step larger
        ((2560, 1280), (640, 320), WEBP, 2),  # 1/4 would be exactly the target
        ((3872, 2592), (1920, 1285), WEBP, 2),  # 1936 px at 1/2: that IDCT needs no margin
        ((3264, 1836), (1920, 1080), WEBP, 1),  # 1632 px at 1/2 is under the target: full decode
        ((3872, 2592), (640, 428), AVIF, 2),  # AVIF keeps 2x at every scale
        ((5120, 2560), (640, 320), AVIF, 4),
        ((1200, 1800), (640, 960), WEBP, 1),
    ],
    ids=str,
)
def test_draft_scale_is_the_smallest_decode_that_keeps_the_margin(source, target, margins, scale):
    assert draft_scale(source, target, margins) == scale


def test_margin_is_at_least_one_so_a_draft_never_decodes_below_the_target():
    assert all(m >= 1 for margins in DRAFT_MARGIN.values() for m in margins.values())
    assert all(set(margins) == {2, 4, 8} for margins in DRAFT_MARGIN.values())


@pytest.mark.parametrize("fmt", ["webp", "avif"])
def test_drafted_jpeg_renders_at_the_exact_target_size(fmt):
    # 2725 px wide, as the corpus saw: 1/4 gives 681.25 px, so the output relies on draft's box.
    buffer = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize((2725, 2225)).save(buffer, "JPEG", quality=90)
    rendered = render(buffer.getvalue(), RenderOptions(width=640, quality=75, format=fmt))
    assert (rendered.width, rendered.height) == (640, 523)
    assert Image.open(io.BytesIO(rendered.body)).size == (640, 523)
