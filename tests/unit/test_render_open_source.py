"""open_source: what counts as an animation."""

from __future__ import annotations

import io

from PIL import Image

from app.render import RenderOptions, render


def test_a_multi_page_tiff_renders_its_first_page_as_a_still():
    pages = [Image.new("RGB", (40, 20), (255, 0, 0)), Image.new("RGB", (10, 30), (0, 0, 255))]
    buffer = io.BytesIO()
    pages[0].save(buffer, "TIFF", save_all=True, append_images=pages[1:])
    rendered = render(buffer.getvalue(), RenderOptions(width=0, quality=75, format="webp"))
    with Image.open(io.BytesIO(rendered.body)) as out:
        assert (out.size, getattr(out, "n_frames", 1), rendered.frames) == ((40, 20), 1, 1)
        assert out.convert("RGB").getpixel((20, 10))[0] > 200


def test_an_apng_with_one_frame_is_a_still():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG", save_all=True, append_images=[])
    rendered = render(buffer.getvalue(), RenderOptions(width=0, quality=75, format="webp"))
    assert rendered.frames == 1
