"""q=auto on a mixed corpus: the quality chosen, its score, bytes and CPU, against fixed q.

    pip install --no-deps --target /tmp/aq-corpus scikit-image==0.26.0 matplotlib==3.11.2
    .venv/bin/python -m bench.auto_quality --packages /tmp/aq-corpus [--target 70] [--widths 640,1920]

The corpus is MANIFEST: images shipped inside two PyPI wheels (read from where pip put them;
nothing is committed or downloaded by this module) plus the shared corpus of photos, each with
its kind and licence (bench/auto_quality_corpus.md repeats the list). Per image, format and
width, in-process (app.render.render, no HTTP, no network):

- `q=auto`: the quality chosen, its SSIMULACRA2, bytes, and the CPU ms of the whole render;
- fixed q 75: the CPU ms of the same render, for the cost ratio;
- a fixed-q grid (FIXED_GRID): bytes and SSIMULACRA2 of the same frame at each q, from which
  the summary takes the smallest single q at which every image that q=100 brings to the target
  reaches it, and compares bytes.

A w=1920 row is printed only for images wider than 640 px (narrower ones give the w=640 output
again: the proxy never enlarges). Summary per format and width: images reaching target - 1,
bytes of q=auto against that fixed q, and the median CPU of q=auto against fixed q75.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from app.render import AutoQuality, RenderOptions, render
from app.render.auto_quality import flatten
from app.render.encode import save, still_arguments
from app.render.ssimulacra2 import Reference
from bench.prepared import prepared_frames

ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPUS = ROOT.parent / "shared" / "corpus" / "photos"
FIXED_GRID = (50, 60, 70, 75, 80, 85, 90, 95, 100)

SKIMAGE = "scikit-image 0.26.0 wheel, skimage/data/"
MPL = "matplotlib 3.11.2 wheel, matplotlib/mpl-data/sample_data/"
#: (file, kind, where, licence). "no per-image notice" = shipped in the wheel under its licence.
MANIFEST: tuple[tuple[str, str, str, str], ...] = (
    ("skimage/data/astronaut.png", "photo", SKIMAGE, "public domain (NASA)"),
    ("skimage/data/chelsea.png", "photo", SKIMAGE, "CC0 (Stefan van der Walt)"),
    ("skimage/data/coffee.png", "photo", SKIMAGE, "CC0 (Rachel Michetti)"),
    ("skimage/data/rocket.jpg", "photo", SKIMAGE, "public domain (SpaceX)"),
    ("skimage/data/hubble_deep_field.jpg", "photo (space)", SKIMAGE, "public domain (NASA)"),
    ("skimage/data/retina.jpg", "photo (medical)", SKIMAGE, "CC0 1.0"),
    ("skimage/data/ihc.png", "photo (microscopy)", SKIMAGE, "no known copyright restrictions"),
    ("skimage/data/camera.png", "greyscale photo", SKIMAGE, "CC0 (Lav Varshney)"),
    ("skimage/data/coins.png", "greyscale photo", SKIMAGE, "no known copyright restrictions (Brooklyn Museum)"),
    ("skimage/data/clock_motion.png", "greyscale photo (blur)", SKIMAGE, "public domain (Stefan van der Walt)"),
    ("skimage/data/moon.png", "greyscale photo", SKIMAGE, "no per-image notice; BSD-3-Clause package"),
    ("skimage/data/cell.png", "greyscale microscopy", SKIMAGE, "CC0"),
    ("skimage/data/microaneurysms.png", "greyscale (small)", SKIMAGE, "CC0 (Andreas Maier)"),
    ("skimage/data/brick.png", "texture", SKIMAGE, "CC0 (CC0Textures)"),
    ("skimage/data/grass.png", "texture", SKIMAGE, "CC0 (CC0Textures)"),
    ("skimage/data/gravel.png", "texture / noise", SKIMAGE, "CC0 (CC0Textures)"),
    ("skimage/data/text.png", "text scan", SKIMAGE, "public domain"),
    ("skimage/data/page.png", "text scan", SKIMAGE, "no per-image notice; BSD-3-Clause package"),
    ("skimage/data/horse.png", "graphic with alpha (silhouette)", SKIMAGE, "CC0 (Andreas Preuss)"),
    ("skimage/data/logo.png", "logo with alpha", SKIMAGE, "no per-image notice; BSD-3-Clause package"),
    ("skimage/data/color.png", "illustration (colour wheel)", SKIMAGE, "no per-image notice; BSD-3-Clause package"),
    ("skimage/data/phantom.png", "illustration (synthetic)", SKIMAGE, "no per-image notice; BSD-3-Clause package"),
    ("skimage/data/chessboard_RGB.png", "graphic (hard edges)", SKIMAGE, "no per-image notice; BSD-3-Clause package"),
    ("matplotlib/mpl-data/sample_data/grace_hopper.jpg", "photo (portrait)", MPL, "public domain (U.S. Navy)"),
    ("matplotlib/mpl-data/sample_data/logo2.png", "logo with alpha", MPL, "Matplotlib licence (PSF-style)"),
)


@dataclass
class Row:
    image: str
    fmt: str
    width: int
    quality: int
    score: float
    size: int
    cpu_ms: float
    fixed_cpu_ms: float
    grid: dict[int, tuple[int, float]]  # q -> (bytes, score)
    encodes: int = 0
    hint: int | None = None  # the family's earlier q, as the serve layer would pass it
    hinted_quality: int = 0
    hinted_score: float = 0.0
    hinted_cpu_ms: float = 0.0
    hinted_encodes: int = 0


def corpus(packages: Path) -> list[tuple[str, Path]]:
    files = [(Path(name).name, packages / name) for name, *_ in MANIFEST]
    files += [(p.name, p) for p in sorted(SHARED_CORPUS.iterdir()) if p.suffix in (".jpg", ".png")]
    missing = [str(path) for _, path in files if not path.exists()]
    if missing:
        raise SystemExit("missing (install the packages with the pip line in this module's docstring):\n  "
                         + "\n  ".join(missing))
    return files


class CountingSave:
    """Counts the encoder calls of app/render/encode.py (the search's candidates)."""

    def __init__(self) -> None:
        self.calls = 0
        self.module = importlib.import_module("app.render.encode")
        self.real = self.module.save
        self.module.save = self

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls += 1
        return self.real(*args, **kwargs)


COUNTER: CountingSave | None = None


def cpu_render(data: bytes, options: RenderOptions):  # type: ignore[no-untyped-def]
    assert COUNTER is not None
    before = COUNTER.calls
    started = time.process_time()
    rendered = render(data, options)
    return rendered, (time.process_time() - started) * 1000, COUNTER.calls - before


def measure(name: str, data: bytes, fmt: str, width: int, target: float, hint: int | None) -> Row:
    auto, auto_ms, encodes = cpu_render(data, RenderOptions(width=width, quality=AutoQuality(target), format=fmt))
    if hint is None:
        hinted, hinted_ms, hinted_encodes = auto, auto_ms, encodes
    else:
        hinted, hinted_ms, hinted_encodes = cpu_render(
            data, RenderOptions(width=width, quality=AutoQuality(target), format=fmt, quality_hint=hint)
        )
    _, fixed_ms, _ = cpu_render(data, RenderOptions(width=width, quality=75, format=fmt))
    frame = prepared_frames(data, RenderOptions(width=width, quality=75, format=fmt))[0]
    reference = Reference(flatten(frame))
    grid = {}
    for q in FIXED_GRID:
        body = save(frame, fmt, still_arguments(fmt, q, frame))
        with Image.open(io.BytesIO(body)) as decoded:
            grid[q] = (len(body), reference.score(flatten(decoded)))
    return Row(name, fmt, width, auto.quality, auto.quality_score or 0.0, len(auto.body), auto_ms, fixed_ms, grid,
               encodes, hint, hinted.quality, hinted.quality_score or 0.0, hinted_ms, hinted_encodes)


def summary(rows: list[Row], target: float) -> list[str]:
    lines = ["| format | w | images | reachable (q100 >= target) | q=auto >= target - 1 | smallest fixed q "
             "(all reachable >= target) | bytes q=auto / that q | median CPU ms q=auto / q75 (ratio) | "
             "median q chosen | median encodes (with the family's hint) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for fmt in sorted({r.fmt for r in rows}):
        for width in sorted({r.width for r in rows}):
            group = [r for r in rows if r.fmt == fmt and r.width == width]
            if not group:
                continue
            reachable = [r for r in group if r.grid[100][1] >= target]
            ok = sum(r.score >= target - 1 for r in reachable)
            fixed_q = next((q for q in FIXED_GRID if all(r.grid[q][1] >= target for r in reachable)), None)
            if fixed_q is None or not reachable:
                ratio = "n/a"
            else:
                auto_bytes = sum(r.size for r in reachable)
                fixed_bytes = sum(r.grid[fixed_q][0] for r in reachable)
                ratio = f"{auto_bytes:,} / {fixed_bytes:,} = {auto_bytes / fixed_bytes:.2f}x"
            with_hint = [r.hinted_encodes for r in group if r.hint is not None]
            hinted_encodes = f"{statistics.median(with_hint):.0f}" if with_hint else "-"
            auto_cpu = statistics.median(r.cpu_ms for r in group)
            fixed_cpu = statistics.median(r.fixed_cpu_ms for r in group)
            lines.append(
                f"| {fmt} | {width} | {len(group)} | {len(reachable)} | {ok} of {len(reachable)} | {fixed_q} | "
                f"{ratio} | "
                f"{auto_cpu:.0f} / {fixed_cpu:.0f} ({auto_cpu / fixed_cpu:.1f}x) | "
                f"{statistics.median(r.quality for r in group):.0f} | "
                f"{statistics.median(r.encodes for r in group):.0f} ({hinted_encodes}) |"
            )
    return lines


def family_summary(rows: list[Row], target: float) -> list[str]:
    """Each image's rows as one srcset family: the first searched without a hint, the others
    with the q found before for the same format, else the other format's, against fixed q75."""
    lines = ["| family | images | median CPU q=auto (hinted) / q75 | hinted rows >= target - 1 | "
             "hinted rows with the same q as unhinted (±2) |", "|---|---|---|---|---|"]
    images = sorted({r.image for r in rows})
    for size in sorted({sum(r.image == i for r in rows) for i in images}):
        family = [i for i in images if sum(r.image == i for r in rows) == size]
        ratios, ok, same, hinted = [], 0, 0, 0
        for image in family:
            members = [r for r in rows if r.image == image]
            ratios.append(sum(r.hinted_cpu_ms for r in members) / sum(r.fixed_cpu_ms for r in members))
            for r in members:
                if r.hint is not None:
                    hinted += 1
                    ok += r.hinted_score >= target - 1
                    same += abs(r.hinted_quality - r.quality) <= 2
        lines.append(f"| {size} renders | {len(family)} | {statistics.median(ratios):.1f}x | {ok} of {hinted} | "
                     f"{same} of {hinted} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", type=Path, required=True, help="where pip put scikit-image and matplotlib")
    parser.add_argument("--target", type=float, default=70.0)
    parser.add_argument("--widths", default="640,1920")
    parser.add_argument("--formats", default="webp,avif")
    parser.add_argument("--only", default="", help="comma-separated file names (a quick subset)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/auto_quality_rows.jsonl"), help="every row, as JSON")
    args = parser.parse_args()
    global COUNTER
    COUNTER = CountingSave()
    files = corpus(args.packages)
    if args.only:
        files = [(n, p) for n, p in files if n in args.only.split(",")]
    rows: list[Row] = []
    print("| image | source | format | w | q chosen | SSIMULACRA2 | bytes | encodes | CPU ms q=auto | CPU ms q75 | "
          "q75 bytes / score | hint: q, encodes, CPU ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, path in files:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            source = f"{image.format} {image.mode} {image.width}x{image.height}"
            wide = image.width
        found: dict[str, int] = {}  # format -> the q found last for this image
        for width in (int(w) for w in args.widths.split(",")):
            if width > 640 and wide <= 640:
                continue
            for fmt in args.formats.split(","):
                hint = found.get(fmt, next(iter(found.values()), None))
                row = measure(name, data, fmt, width, args.target, hint)
                found[fmt] = row.quality
                rows.append(row)
                with args.out.open("a") as out:
                    out.write(json.dumps(dataclasses.asdict(row), default=float) + "\n")
                q75 = row.grid[75]
                hinted = "" if hint is None else (
                    f"{hint}: q {row.hinted_quality}, {row.hinted_encodes}, {row.hinted_cpu_ms:.0f}"
                )
                print(f"| {name} | {source} | {fmt} | {width} | {row.quality} | {row.score:.1f} | {row.size:,} | "
                      f"{row.encodes} | {row.cpu_ms:.0f} | {row.fixed_cpu_ms:.0f} | {q75[0]:,} / {q75[1]:.1f} | "
                      f"{hinted} |", flush=True)
    print()
    print("\n".join(summary(rows, args.target)))
    print()
    print("\n".join(family_summary(rows, args.target)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
