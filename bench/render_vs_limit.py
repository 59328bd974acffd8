"""CPU time and quality of our render() against the shared bench's in-process limit, WebP q75.

    .venv/bin/python -m bench.render_vs_limit [--widths 640,1920] [--reps 4]

Both run in this one process over the 9 corpus photos, alternating (ours, limit / limit, ours)
so drift on a shared machine hits both; CPU is time.process_time() per image (all threads),
which on a CPU-bound c4 run is what throughput is inverse to. The limit is
../shared/bench/lib/limit_bench.py's `pillow` variant (draft to 1x, exif_transpose, LANCZOS with
reducing_gap 3, WebP method 4). SSIM is ../shared/bench/lib/quality.py's mean luma SSIM of our
outputs; the limit's is its recorded anchor (baseline/2026-11-25-quality). No network.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

from app.render import RenderOptions, render
from bench.quality_map import PHOTOS, SHARED, load_quality_lib, photo_names

LIMIT_SSIM_KB = {640: (0.9469, 440), 1920: (0.9581, 1894)}  # recorded limit-pillow WebP q75


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="640,1920")
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(SHARED / "bench" / "lib"))
    import limit_bench  # the shared harness's module, not a package

    limit_bench._init_pillow()
    quality = load_quality_lib()
    refs = quality.References(str(PHOTOS))
    photos = photo_names([])
    data = {p: (PHOTOS / p).read_bytes() for p in photos}
    limit_bench.DATA.update(data)
    print("| w | ours CPU ms/img | limit CPU ms/img | ours / limit CPU | ours SSIM | limit SSIM | ours KB | limit KB |")
    print("|---|---|---|---|---|---|---|---|")
    for w in (int(x) for x in args.widths.split(",")):

        def ours(p: str, w: int = w) -> bytes:
            return render(data[p], RenderOptions(width=w, quality=75, format="webp")).body

        def limit(p: str, w: int = w) -> None:
            limit_bench.pillow_job(p, w, "webp", 75, "pillow", {"method": 4})

        cpu: dict[str, list[float]] = {"ours": [], "limit": []}
        for rep in range(args.reps):
            for name in ("ours", "limit") if rep % 2 == 0 else ("limit", "ours"):
                started = time.process_time()
                for p in photos:
                    (ours if name == "ours" else limit)(p)
                cpu[name].append((time.process_time() - started) * 1000 / len(photos))
        bodies = {p: ours(p) for p in photos}
        ssim = statistics.fmean(quality.score(refs, p, bodies[p])["ssim"] for p in photos)
        o, lim = statistics.median(cpu["ours"]), statistics.median(cpu["limit"])
        limit_ssim, limit_kb = LIMIT_SSIM_KB.get(w, (float("nan"), float("nan")))
        kb = sum(map(len, bodies.values())) / 1024
        print(f"| {w} | {o:.0f} | {lim:.0f} | {o / lim:.2f} | {ssim:.4f} | {limit_ssim} | {kb:.0f} | {limit_kb} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
