"""Write docs/fidelity-table.md: colour error, size and bytes of every corpus file's output.

    .venv/bin/python -m bench.fidelity_table [--out docs/fidelity-table.md] [--q 75]

The files, widths and expectations are those of tests/integration/test_edge_fidelity.py, and the
colour error is the one those tests bound (tests/colour.py: mean CIEDE2000 between the source
converted to sRGB through its ICC profile and the decoded output, both flattened onto white).
Renders in-process with app.render.render; touches no network.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from app.render import RenderOptions, render
from tests.colour import delta_e_2000, flatten_on_white, srgb_lab, srgb_reference
from tests.integration.test_edge_fidelity import CORPUS, EDGE, PHOTO_WIDTH, PHOTOS

ROOT = Path(__file__).resolve().parents[1]


def row(path: str, w: int, q: int) -> str:
    data = (CORPUS / path).read_bytes()
    with Image.open(io.BytesIO(data)) as source:
        source_desc = f"{source.format} {source.mode} {source.width}x{source.height}"
        profile = "yes" if source.info.get("icc_profile") else "no"
    cells = [f"`{path}`", source_desc, profile, str(w)]
    for fmt in ("webp", "avif"):
        started = time.perf_counter()
        rendered = render(data, RenderOptions(width=w, quality=q, format=fmt))
        elapsed = time.perf_counter() - started
        with Image.open(io.BytesIO(rendered.body)) as out:
            out.load()
            output = flatten_on_white(out)
            mode = out.mode
        reference = srgb_reference(data, output.size)
        error = float(np.mean(delta_e_2000(srgb_lab(np.asarray(reference)), srgb_lab(np.asarray(output)))))
        frames = f" x{rendered.frames}" if rendered.frames > 1 else ""
        cells += [f"{output.width}x{output.height} {mode}{frames}", f"{len(rendered.body):,}", f"{error:.2f}"]
        cells.append(f"{elapsed * 1000:.0f}")
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "fidelity-table.md"))
    parser.add_argument("--q", type=int, default=75)
    args = parser.parse_args()
    columns = ["file", "source", "ICC", "w"] + [
        f"{f} {c}" for f in ("WebP", "AVIF") for c in ("size", "bytes", "ΔE00", "ms")
    ]
    header = "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"
    edge = [row(f"edge/{name}", case.w, args.q) for name, case in sorted(EDGE.items())]
    photos = [row(f"photos/{name}", PHOTO_WIDTH, args.q) for name in PHOTOS]
    text = "\n".join(
        [
            "## Measured fidelity per corpus file",
            "",
            f"Every corpus file the MANIFEST expects a 200 for, and every photo, rendered at q={args.q} by",
            "`app.render.render` (the service's pipeline); regenerate with",
            "`.venv/bin/python -m bench.fidelity_table`.",
            "ΔE00 is the mean CIEDE2000 difference between the source as a colour-managed viewer shows it",
            "(converted to sRGB through its ICC profile by LittleCMS, upright, LANCZOS-resized to the output",
            "size, flattened onto white) and the decoded output, flattened the same way; for an animation,",
            "its first frame. ms is one in-process render on a shared 2-core machine (indicative only).",
            "`tests/integration/test_edge_fidelity.py` bounds ΔE00 at 1.5 for the edge files and 3.0 for the photos.",
            "",
            "### Edge corpus (w = 0 unless the file needs a width to show resizing)",
            "",
            header,
            *edge,
            "",
            f"### Photos (w = {PHOTO_WIDTH})",
            "",
            header,
            *photos,
            "",
        ]
    )
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
