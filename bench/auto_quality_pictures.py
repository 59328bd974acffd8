"""The picture in docs/image-fidelity.md: one crop of one image at several q=auto targets.

    pip install --no-deps --target /tmp/aq-corpus scikit-image==0.26.0
    .venv/bin/python -m bench.auto_quality_pictures --packages /tmp/aq-corpus [--out docs/auto-quality-targets.png]

scikit-image's `coffee.png` (CC0, Rachel Michetti), rendered by app.render at its own width as
WebP with q=auto at targets 50, 70 (the default) and 90, next to the source; each panel is the
same crop enlarged 2x with nearest-neighbour so the codec's work stays visible, labelled with
the target, the q chosen, the score and the bytes of the whole image.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image, ImageDraw

from app.render import AutoQuality, RenderOptions, render

ROOT = Path(__file__).resolve().parents[1]
CROP = (300, 60, 460, 180)  # the cup's rim, the spoon and the saucer: edges, highlights, gradients
ZOOM = 2


def panel(image: Image.Image, label: str) -> Image.Image:
    crop = image.convert("RGB").crop(CROP)
    big = crop.resize((crop.width * ZOOM, crop.height * ZOOM), Image.Resampling.NEAREST)
    out = Image.new("RGB", (big.width, big.height + 18), (255, 255, 255))
    out.paste(big, (0, 18))
    ImageDraw.Draw(out).text((4, 3), label, fill=(0, 0, 0))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "auto-quality-targets.png")
    args = parser.parse_args()
    data = (args.packages / "skimage" / "data" / "coffee.png").read_bytes()
    with Image.open(io.BytesIO(data)) as source:
        panels = [panel(source, f"source PNG, {len(data):,} B")]
    for target in (50.0, 70.0, 90.0):
        rendered = render(data, RenderOptions(width=0, quality=AutoQuality(target), format="webp"))
        with Image.open(io.BytesIO(rendered.body)) as out:
            label = f"target {target:g}: q{rendered.quality}, {rendered.quality_score:.1f}, {len(rendered.body):,} B"
            panels.append(panel(out, label))
            print(label)
    strip = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), panels[0].height), (255,) * 3)
    x = 0
    for p in panels:
        strip.paste(p, (x, 0))
        x += p.width + 4
    strip.save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} B)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
