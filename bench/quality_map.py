"""Measure the AVIF quality map: for each WebP q, the AVIF encoder quality with the same mean SSIM.

    .venv/bin/python -m bench.quality_map [--widths 640,1920] [--webp-q 50,65,75,85,90,95]
                                          [--avif-q 20,30,...] [--photos panda,saw] [--json out.json]

Every output is made by app.render.render (the service's own pipeline: JPEG draft, LANCZOS,
orientation, sRGB, and the encoder settings of app/render/encode.py). For the AVIF grid the
quality map is switched to the identity while measuring, so `q` reaches the encoder unchanged.
The score is ../shared/bench/lib/quality.py's: mean luma SSIM (BT.601 luma, Gaussian 11x11,
sigma 1.5) against a Pillow LANCZOS resize of the upright, full-resolution source at the
output's size. Per width, the mean SSIM of each WebP q over the photos is located on the
AVIF curve (mean SSIM per encoder quality) by linear interpolation; "combined" does the same on
the means over both widths. Paste the "combined" row into AVIF_QUALITY_MAP.

Runs serially (about 5 minutes on 2 cores for the full grid); touches no network.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from app.render import RenderOptions, render

# The module, not the `encode` step function that app.render re-exports under the same name.
encode = importlib.import_module("app.render.encode")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PHOTOS = SHARED / "corpus" / "photos"
QUALITY_LIB = SHARED / "bench" / "lib" / "quality.py"

WEBP_Q = (50, 65, 75, 85, 90, 95)
AVIF_Q = (20, 30, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95)
WIDTHS = (640, 1920)
IDENTITY_MAP = ((1, 1), (100, 100))


def load_quality_lib(path: Path = QUALITY_LIB) -> ModuleType:
    """The shared benchmark's metric module, imported from its file (it is not a package)."""
    spec = importlib.util.spec_from_file_location("shared_bench_quality", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load the SSIM metric from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not module.selftest(verbose=False):
        raise SystemExit("the SSIM metric failed its self-test")
    return module


def photo_names(filters: Sequence[str]) -> list[str]:
    names = sorted(p.name for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    return [n for n in names if not filters or any(f in n for f in filters)]


def measure(
    quality_lib: ModuleType, photos: Sequence[str], widths: Sequence[int], webp_q: Sequence[int], avif_q: Sequence[int]
) -> dict[tuple[int, str, int], list[float]]:
    """(width, format, q) -> SSIM per photo, in `photos` order."""
    refs = quality_lib.References(str(PHOTOS))
    scores: dict[tuple[int, str, int], list[float]] = {}
    saved_map = encode.AVIF_QUALITY_MAP
    encode.AVIF_QUALITY_MAP = IDENTITY_MAP
    try:
        for photo in photos:
            data = (PHOTOS / photo).read_bytes()
            started = time.monotonic()
            for width in widths:
                for fmt, grid in (("webp", webp_q), ("avif", avif_q)):
                    for q in grid:
                        body = render(data, RenderOptions(width=width, quality=q, format=fmt)).body
                        scores.setdefault((width, fmt, q), []).append(quality_lib.score(refs, photo, body)["ssim"])
            refs.ref.clear()  # one photo's references at a time: the 10 MP sources are large
            refs.src.clear()
            print(f"[quality_map] {photo}: {time.monotonic() - started:.1f} s", file=sys.stderr)
    finally:
        encode.AVIF_QUALITY_MAP = saved_map
    return scores


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def equal_quality(target: float, curve: Sequence[tuple[int, float]]) -> float | None:
    """The encoder quality whose SSIM is `target`, by linear interpolation on (q, ssim) points
    sorted by q; None when the target is outside the curve."""
    for (q0, s0), (q1, s1) in itertools.pairwise(curve):
        if min(s0, s1) <= target <= max(s0, s1) and s0 != s1:
            return q0 + (q1 - q0) * (target - s0) / (s1 - s0)
    return None


def report(
    scores: dict[tuple[int, str, int], list[float]],
    widths: Sequence[int],
    webp_q: Sequence[int],
    avif_q: Sequence[int],
) -> tuple[str, dict[str, dict[int, float | None]]]:
    columns = sorted({*webp_q, *avif_q})
    groups = {f"w={w}": [w] for w in widths}
    groups["combined"] = list(widths)
    lines = [
        f"AVIF codec={encode.AVIF_CODEC} speed={encode.AVIF_SPEED} subsampling={encode.ENCODER.avif_subsampling} "
        f"options={dict(encode.ENCODER.avif_advanced)}; WebP method={encode.WEBP_METHOD} "
        f"({encode.ENCODER.webp_method_small} up to {encode.ENCODER.webp_small_pixels / 1e6:g} MP)",
        "",
        "Mean luma SSIM per quality:",
        "| group | fmt | " + " | ".join(f"q{q}" for q in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    matches: dict[str, dict[int, float | None]] = {}
    for name, group in groups.items():

        def group_mean(fmt: str, q: int, group: list[int] = group) -> float:
            return mean([s for w in group for s in scores[(w, fmt, q)]])

        for fmt, grid in (("webp", webp_q), ("avif", avif_q)):
            cells = {q: f"{group_mean(fmt, q):.4f}" for q in grid}
            lines.append(f"| {name} | {fmt} | " + " | ".join(cells.get(q, "") for q in columns) + " |")
        curve = [(q, group_mean("avif", q)) for q in sorted(avif_q)]
        matches[name] = {q: equal_quality(group_mean("webp", q), curve) for q in webp_q}
    lines += [
        "",
        "AVIF encoder quality with the SSIM of WebP q:",
        "| group | " + " | ".join(f"webp q{q}" for q in webp_q) + " |",
        "|---|" + "---|" * len(webp_q),
    ]
    for name, found in matches.items():
        cells = ["out of range" if v is None else f"{v:.1f}" for v in found.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines), matches


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    parser.add_argument("--webp-q", default=",".join(map(str, WEBP_Q)))
    parser.add_argument("--avif-q", default=",".join(map(str, AVIF_Q)))
    parser.add_argument("--photos", default="", help="only photos whose name contains one of these (comma list)")
    parser.add_argument("--json", help="also write the SSIM per photo and the matches here")
    args = parser.parse_args(argv)

    def numbers(text: str) -> list[int]:
        return sorted({int(item) for item in text.split(",") if item.strip()})

    widths, webp_q, avif_q = numbers(args.widths), numbers(args.webp_q), numbers(args.avif_q)
    photos = photo_names([f for f in args.photos.split(",") if f])
    if not photos:
        parser.error("no photo matched")
    started = time.monotonic()
    scores = measure(load_quality_lib(), photos, widths, webp_q, avif_q)
    text, matches = report(scores, widths, webp_q, avif_q)
    print(text)
    renders = sum(len(v) for v in scores.values())
    print(f"\n{len(photos)} photos, {renders} renders in {time.monotonic() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "photos": photos,
                    "scores": {f"{w}/{fmt}/{q}": v for (w, fmt, q), v in scores.items()},
                    "matches": matches,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
