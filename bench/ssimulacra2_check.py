"""How fast app/render/ssimulacra2.py is, and how closely it agrees with the reference.

    .venv/bin/python -m bench.ssimulacra2_check [--widths 640,1920] [--q 40,75,95] [--corpus DIR]

The reference is the `ssimulacra2` package (requirements-dev.txt), the one the shared quality
bench scores with (`quality.sh --ssimulacra2`). For every photo of the corpus and width, the
pipeline's own resized image (app/render, before the encoder) is encoded as WebP and AVIF at each
q, decoded, and scored by both; each line prints both scores, the difference and the seconds.
The summary gives the largest difference and the median time of each, per width. Besides the
exact port it scores `fast-downscaled` (both images halved first) to show what that shortcut
costs in agreement. In-process, no network.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

from PIL import Image

from app.render import RenderOptions
from app.render.auto_quality import flatten
from app.render.encode import encoder_arguments
from app.render.ssimulacra2 import ssimulacra2
from bench.prepared import prepared_frames

ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPUS = ROOT.parent / "shared" / "corpus" / "photos"


def reference_score(reference: Image.Image, distorted: Image.Image) -> float:
    from ssimulacra2 import compute_ssimulacra2  # type: ignore[import-untyped]

    buffers = []
    for image in (reference, distorted):
        buffer = io.BytesIO()
        image.save(buffer, "PNG", compress_level=0)
        buffer.seek(0)
        buffers.append(buffer)
    return float(compute_ssimulacra2(*buffers))


def timed(function, *args):  # type: ignore[no-untyped-def]
    started = time.process_time()
    value = function(*args)
    return value, time.process_time() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(SHARED_CORPUS))
    parser.add_argument("--widths", default="640,1920")
    parser.add_argument("--q", default="40,75,95")
    parser.add_argument("--formats", default="webp,avif")
    parser.add_argument("--no-reference", action="store_true", help="time the fast port only")
    args = parser.parse_args()
    photos = sorted(p for p in Path(args.corpus).iterdir() if p.suffix.lower() in (".jpg", ".png", ".webp"))
    rows: dict[int, list[tuple[float, float, float, float, float]]] = {}
    for width in (int(w) for w in args.widths.split(",")):
        for photo in photos:
            data = photo.read_bytes()
            for fmt in args.formats.split(","):
                frame = prepared_frames(data, RenderOptions(width=width, quality=75, format=fmt))[0]
                reference = flatten(frame)
                for q in (int(v) for v in args.q.split(",")):
                    buffer = io.BytesIO()
                    frame.save(buffer, **encoder_arguments(fmt, q, pixels=frame.width * frame.height))
                    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
                        distorted = flatten(decoded)
                    fast, fast_s = timed(ssimulacra2, reference, distorted)
                    half = (max(8, reference.width // 2), max(8, reference.height // 2))
                    box = Image.Resampling.BOX
                    small, small_s = timed(ssimulacra2, reference.resize(half, box), distorted.resize(half, box))
                    if args.no_reference:
                        ref, ref_s = float("nan"), 0.0
                    else:
                        ref, ref_s = timed(reference_score, reference, distorted)
                    rows.setdefault(width, []).append((ref, fast, small, ref_s, fast_s))
                    print(f"w={width} {photo.name} {fmt} q={q} {frame.width}x{frame.height}: reference {ref:.3f} "
                          f"({ref_s:.2f} s)  fast {fast:.3f} ({fast_s:.3f} s, diff {fast - ref:+.3f})  "
                          f"fast-downscaled {small:.3f} (diff {small - ref:+.2f}, {small_s:.3f} s)", flush=True)
    print("\n| w | pairs | reference CPU s (median) | fast CPU s (median) | speed-up | max abs diff | "
          "downscaled: max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for width, values in rows.items():
        ref_t = statistics.median(v[3] for v in values)
        fast_t = statistics.median(v[4] for v in values)
        diff = max(abs(v[1] - v[0]) for v in values)
        small_diff = max(abs(v[2] - v[0]) for v in values)
        print(f"| {width} | {len(values)} | {ref_t:.2f} | {fast_t:.3f} | {ref_t / fast_t:.1f}x | {diff:.3f} | "
              f"{small_diff:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
