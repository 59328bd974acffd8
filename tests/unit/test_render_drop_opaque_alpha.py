"""drop_opaque_alpha: alpha kept where it shows, never invented; one mode for a whole animation."""

from __future__ import annotations

from PIL import Image

from app.render.canvas import Canvas, Frame, RenderOptions
from app.render.drop_opaque_alpha import drop_opaque_alpha

OPTIONS = RenderOptions(width=0, quality=75, format="webp")


def run(images: list[Image.Image], animated: bool) -> list[str]:
    canvas = Canvas(data=b"", loop=0 if animated else None, frames=iter(Frame(i, 10) for i in images))
    drop_opaque_alpha(canvas, OPTIONS)
    return [frame.image.mode for frame in canvas.frames]


OPAQUE = Image.new("RGBA", (4, 4), (1, 2, 3, 255))
CLEAR = Image.new("RGBA", (4, 4), (1, 2, 3, 0))
RGB = Image.new("RGB", (4, 4))


def test_a_still_with_opaque_alpha_loses_the_channel():
    assert run([OPAQUE], animated=False) == ["RGB"]


def test_a_still_with_transparency_keeps_it():
    assert run([CLEAR], animated=False) == ["RGBA"]


def test_an_animation_with_one_transparent_frame_is_rgba_throughout():
    # An RGB first frame would make the AVIF encoder drop the later frame's alpha.
    assert run([RGB, OPAQUE, CLEAR], animated=True) == ["RGBA", "RGBA", "RGBA"]


def test_an_animation_with_no_transparent_pixel_gets_no_alpha():
    assert run([OPAQUE, RGB, OPAQUE], animated=True) == ["RGB", "RGB", "RGB"]
