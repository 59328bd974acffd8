"""Turn each frame upright according to the EXIF orientation read by plan_geometry."""

from __future__ import annotations

from PIL import Image

from app.render.canvas import Canvas, RenderOptions
from app.render.frames import map_frames

_T = Image.Transpose
TRANSPOSES: dict[int, tuple[Image.Transpose, ...]] = {
    2: (_T.FLIP_LEFT_RIGHT,),
    3: (_T.ROTATE_180,),
    4: (_T.FLIP_TOP_BOTTOM,),
    5: (_T.TRANSPOSE,),
    6: (_T.ROTATE_270,),
    7: (_T.TRANSVERSE,),
    8: (_T.ROTATE_90,),
}


def apply_orientation(canvas: Canvas, options: RenderOptions) -> None:
    steps = TRANSPOSES.get(canvas.orientation, ())
    if not steps:
        return

    def change(image: Image.Image) -> Image.Image:
        for method in steps:
            image = image.transpose(method)
        return image

    map_frames(canvas, change)
