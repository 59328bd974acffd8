"""Choosing q=auto's search constants: replay searches over every corpus image's score curve.

    pip install --no-deps --target /tmp/aq-corpus scikit-image==0.26.0 matplotlib==3.11.2
    .venv/bin/python -m bench.auto_quality_replay --dump --packages /tmp/aq-corpus   # ~5 min
    .venv/bin/python -m bench.auto_quality_replay                                    # seconds

--dump encodes each corpus image (bench/auto_quality.py's corpus) at w=640 and 1920, WebP and
AVIF, at q 1, 5, 10, ..., 100, and records bytes, SSIMULACRA2 and the CPU of each encode and score
(plus the render up to the encoder and the reference's preparation) in a JSON-lines file. The
replay then runs app/render/auto_quality.search() over those curves (score and log-bytes
interpolated between the measured q) with each candidate set of constants, and prints, per
format and width: images reaching target - 1, candidates per search, the median CPU of the
search against a fixed q75 render (in-process: decode + resize + the candidates, no HTTP), and
bytes against the lowest passing q and against fixed q90. No network; nothing is committed.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from app.render import RenderOptions, auto_quality
from app.render.auto_quality import flatten, search
from app.render.encode import save, start_quality, still_arguments
from app.render.ssimulacra2 import Reference
from bench.auto_quality import corpus
from bench.prepared import prepared_frames

CURVE_Q = (1, *range(5, 101, 5))
DEFAULT_FILE = Path("/tmp/auto_quality_curves.jsonl")


def dump(packages: Path, out: Path) -> None:
    with out.open("w") as rows:
        for name, path in corpus(packages):
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                wide = image.width
            for width in (640, 1920):
                if width > 640 and wide <= 640:
                    continue
                for fmt in ("webp", "avif"):
                    started = time.process_time()
                    frame = prepared_frames(data, RenderOptions(width=width, quality=75, format=fmt))[0]
                    prepare_s = time.process_time() - started
                    started = time.process_time()
                    reference = Reference(flatten(frame))
                    reference_s = time.process_time() - started
                    curve = {}
                    for q in CURVE_Q:
                        started = time.process_time()
                        body = save(frame, fmt, still_arguments(fmt, q, frame))
                        encode_s = time.process_time() - started
                        started = time.process_time()
                        with Image.open(io.BytesIO(body)) as decoded:
                            score = reference.score(flatten(decoded))
                        curve[q] = (len(body), score, encode_s, time.process_time() - started)
                    row = dict(
                        image=name, fmt=fmt, width=width, pixels=frame.width * frame.height,
                        prepare_s=prepare_s, reference_s=reference_s, curve=curve,
                    )
                    rows.write(json.dumps(row) + "\n")
                    rows.flush()
                    print(name, fmt, width, flush=True)


@dataclass(frozen=True)
class Curve:
    """One image's measured (bytes, score, encode s, score s) by q, interpolated in between."""

    points: dict[int, tuple[float, float, float, float]]

    def at(self, q: int) -> tuple[float, float, float, float]:
        qs = sorted(self.points)
        if q <= qs[0]:
            return self.points[qs[0]]
        for low, high in itertools.pairwise(qs):
            if low <= q <= high:
                a, b, f = self.points[low], self.points[high], (q - low) / (high - low)
                size = math.exp(math.log(a[0]) * (1 - f) + math.log(b[0]) * f)
                return (size, *(a[i] * (1 - f) + b[i] * f for i in (1, 2, 3)))  # type: ignore[return-value]
        return self.points[qs[-1]]


@contextmanager
def constants(**values: object) -> Iterator[None]:
    """app.render.auto_quality's module constants set to `values` for the block."""
    saved = {name: getattr(auto_quality, name) for name in values}
    for name, value in values.items():
        setattr(auto_quality, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(auto_quality, name, value)


def replay(rows: list[dict], target: float) -> list[str]:
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        curve = Curve({int(q): tuple(v) for q, v in row["curve"].items()})  # type: ignore[misc]
        start = start_quality(row["fmt"], row["pixels"])  # where encode() starts it
        probed: list[int] = []

        def probe(q: int, curve: Curve = curve, probed: list[int] = probed) -> tuple[bytes, float]:
            probed.append(q)
            return b"", curve.at(q)[1]

        choice = search(probe, target, start=start)
        tried = set(probed)
        size, score, *_ = curve.at(choice.quality)
        cpu = row["prepare_s"] + row["reference_s"] + sum(curve.at(q)[2] + curve.at(q)[3] for q in tried)
        fixed = row["prepare_s"] + curve.at(75)[2]
        lowest = next((q for q in range(1, 101) if curve.at(q)[1] >= target), 100)
        groups.setdefault((row["fmt"], row["width"]), []).append(
            dict(score=score, size=size, probes=choice.encodes, ratio=cpu / fixed, lowest=curve.at(lowest)[0],
                 q90=curve.at(90)[0], reachable=curve.at(100)[1] >= target)
        )
    lines = []
    for (fmt, width), group in sorted(groups.items()):
        reach = [g for g in group if g["reachable"]]
        lines.append(
            f"| {fmt} | {width} | {sum(g['score'] >= target - 1 for g in reach)} of {len(reach)} | "
            f"{statistics.median(g['probes'] for g in group):g} ({statistics.mean(g['probes'] for g in group):.2f}) | "
            f"{statistics.median(g['ratio'] for g in group):.2f}x | "
            f"{sum(g['size'] for g in group) / sum(g['lowest'] for g in group):.3f}x | "
            f"{sum(g['size'] for g in reach) / sum(g['q90'] for g in reach):.2f}x |"
        )
    return lines


#: The constants tried (name: module constants); "as landed" is the module as it is.
CANDIDATES: dict[str, dict[str, object]] = {
    "before (start 75/66, slope 0.5, stop within 1 point or 2 q)": dict(
        START={"webp": 75, "avif": 66}, START_LARGE={"webp": 75, "avif": 66},
        SLOPES=((1000, 0.5),), MARGIN=0.0, CLOSE=1.0, TOLERANCE=2,
    ),
    "stop within 3 points, 4 q": dict(CLOSE=3.0, TOLERANCE=4),
    "stop within 6 points, 4 q": dict(CLOSE=6.0, TOLERANCE=4),
    "one slope (0.5) instead of the bands": dict(SLOPES=((1000, 0.5),)),
    "no margin past the target": dict(MARGIN=0.0),
    "as landed": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", action="store_true", help="encode and score the curves first")
    parser.add_argument("--packages", type=Path, default=Path("/tmp/aq-corpus"))
    parser.add_argument("--curves", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--target", type=float, default=70.0)
    args = parser.parse_args()
    if args.dump:
        dump(args.packages, args.curves)
    rows = [json.loads(line) for line in args.curves.read_text().splitlines()]
    for name, values in CANDIDATES.items():
        print(f"\n{name}\n")
        print(
            "| format | w | >= target - 1 | candidates median (mean) | CPU / fixed q75 (median) | "
            "bytes / lowest passing q | bytes / fixed q90 |"
        )
        print("|---|---|---|---|---|---|---|")
        with constants(**values):
            print("\n".join(replay(rows, args.target)))


if __name__ == "__main__":
    main()
