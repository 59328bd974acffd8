"""Measure the peak memory of renders and fit app/render/estimate.py's constants to it.

Generates sources (noisy and flat JPEG, noisy RGB and palette PNG, flat 48 MP PNG, a noisy
WebP, GIF and WebP animations at the frame/pixel caps), renders each at several widths as WebP
and AVIF, every render in a fresh subprocess, and records the peak RSS (VmHWM) above the
process's baseline after imports and after reading the source (the body is accounted for
separately, as a fetched body). Then fits, in order:

  DECODE[format]       from the resized rows (small output), per decoded pixel
  ENCODE[fmt, anim]    from what the w=0 rows need beyond the decode, per output pixel

each as the largest per-pixel figure any row needs, times MARGIN, and prints the constants
and a table of estimated against measured peaks (estimate must be >= measured everywhere).

    python -m bench.memory_model [--quick] [--fit-only] [--only SUBSTRING]

Results are kept in test-artifacts/memory_model/results.json, so an interrupted run resumes
and --fit-only refits without rendering again. One 48 MP w=0 AVIF render takes ~1.3 GB.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "test-artifacts" / "memory_model"
RESULTS = WORK / "results.json"
MB = 1024 * 1024
MARGIN = 1.10


@dataclass(frozen=True)
class SourceSpec:
    name: str
    widths: tuple[int, ...]
    quick: bool = False  # part of the --quick grid


SOURCES = (
    SourceSpec("jpeg_noisy_1mp", (0, 640), quick=True),
    SourceSpec("jpeg_noisy_12mp", (0, 640, 1920), quick=True),
    SourceSpec("jpeg_noisy_48mp", (0, 640, 1920)),
    SourceSpec("jpeg_flat_48mp", (0, 640)),
    SourceSpec("jpeg_gray_12mp", (0, 640)),
    SourceSpec("png_noisy_12mp", (0, 640, 1920), quick=True),
    SourceSpec("png_palette_12mp", (0, 640)),
    SourceSpec("png_flat_48mp", (0, 640)),
    SourceSpec("webp_noisy_12mp", (0, 640)),
    SourceSpec("gif_anim_300x400px", (0, 200), quick=True),
    SourceSpec("webp_anim_100x500px", (0, 200)),
)
FORMATS = ("webp", "avif")


# -- sources ---------------------------------------------------------------------------------


def _noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0):
    from PIL import Image

    channels = {"RGB": 3, "L": 1, "P": 1}[mode]
    rng = __import__("random").Random(seed)
    data = rng.randbytes(size[0] * size[1] * channels)
    image = Image.frombytes(mode, size, data)
    if mode == "P":
        image.putpalette(bytes(rng.randrange(256) for _ in range(768)))
    return image


def _mp(megapixels: int) -> tuple[int, int]:
    height = int(math.sqrt(megapixels * 1e6 * 3 / 4))
    return height * 4 // 3, height


def generate(name: str) -> Path:
    """Write the named source once into WORK; later runs reuse it."""
    from PIL import Image

    suffix = name.split("_")[0].replace("jpeg", "jpg")
    path = WORK / f"{name}.{suffix}"
    if path.exists():
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    kind, content, size = name.split("_", 2)
    buffer = io.BytesIO()
    if name == "png_flat_48mp":
        from tests.upstream import corpus_dir

        path.write_bytes((corpus_dir() / "edge" / "solid_48mp.png").read_bytes())  # 8000x6000, one colour
        return path
    if name == "gif_anim_300x400px":
        frames = [_noise((400, 400), "P", seed) for seed in range(300)]  # 48 MP in all, at the caps
        frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    elif name == "webp_anim_100x500px":
        frames = [_noise((500, 500), "RGB", seed) for seed in range(100)]
        frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], duration=40, quality=50, method=0)
    else:
        dims = _mp(int(size.removesuffix("mp")))
        if content == "flat":
            image = Image.linear_gradient("L").resize(dims).convert("RGB")
        elif content == "gray":
            image = _noise(dims, "L")
        elif content == "palette":
            image = _noise(dims, "P")
        else:
            image = _noise(dims)
        if kind == "jpeg":
            image.save(buffer, "JPEG", quality=85 if content == "noisy" else 90)
        elif kind == "png":
            image.save(buffer, "PNG", compress_level=1)
        else:
            image.save(buffer, "WEBP", quality=75, method=0)
    path.write_bytes(buffer.getvalue())
    return path


# -- one measurement, in a fresh process ----------------------------------------------------


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def child(path: str, width: int, fmt: str) -> None:
    from app.render import RenderOptions, render

    data = Path(path).read_bytes()
    baseline = _vm_hwm()
    started = time.process_time()
    rendered = render(data, RenderOptions(width=width, quality=75, format=fmt))
    print(json.dumps({
        "measured": _vm_hwm() - baseline,
        "output": f"{rendered.width}x{rendered.height}",
        "frames": rendered.frames,
        "cpu_s": round(time.process_time() - started, 1),
    }))


def measure(path: Path, width: int, fmt: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "bench.memory_model", "--child", str(path), str(width), fmt],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{path.name} w={width} {fmt}: {result.stderr[-2000:]}")
    return json.loads(result.stdout)


# -- the fit -----------------------------------------------------------------------------------


def shape_of(path: Path, width: int, fmt: str) -> dict[str, object]:
    from dataclasses import asdict

    from app.render import RenderOptions
    from app.render.estimate import render_shape

    return asdict(render_shape(path.read_bytes(), RenderOptions(width=width, quality=75, format=fmt)))


def fit(rows: list[dict]) -> dict[str, dict]:
    """Constants such that every row's estimate is >= its measurement, each times MARGIN.

    FIXED[fmt] is the smallest render's whole peak. Then, alternately, DECODE from the resized
    stills (output at most a quarter of the decoded pixels) given ENCODE, and ENCODE from every
    still given DECODE, each as the largest per-pixel need of any row; a few rounds settle it.
    ACCUMULATED comes last, from the animations, given the rest.
    """
    from app.render import estimate

    stills = [r for r in rows if not r["animated"]]
    fixed = {fmt: min((r["measured"] for r in rows if r["format"] == fmt), default=0) for fmt in FORMATS}
    decode: dict[str, float] = {}
    encode = {fmt: 0.0 for fmt in FORMATS}

    def known(row: dict, with_decode: bool, with_encode: bool) -> float:
        dec, out = row["decoded_pixels"], row["output_pixels"]
        used = fixed[row["format"]] + estimate.mode_extra(row["mode"]) * dec
        if dec != out:
            used += estimate.RESIZE_PASS * math.sqrt(dec * out)
        if with_decode:
            used += decode.get(row["source_format"], max(decode.values(), default=0.0)) * dec
        if with_encode:
            used += encode[row["format"]] * out
        return used

    for _ in range(6):
        decode = {}
        for row in stills:
            if row["output_pixels"] * 4 <= row["decoded_pixels"]:
                need = (row["measured"] - known(row, False, True)) / row["decoded_pixels"]
                decode[row["source_format"]] = max(decode.get(row["source_format"], 0.0), need)
        encode = {fmt: max([(r["measured"] - known(r, True, False)) / r["output_pixels"]
                            for r in stills if r["format"] == fmt], default=0.0) for fmt in FORMATS}
    accumulated = {
        fmt: max([(r["measured"] - known(r, True, True)) / (r["output_pixels"] * r["frames"])
                  for r in rows if r["animated"] and r["format"] == fmt], default=estimate.ACCUMULATED[fmt])
        for fmt in FORMATS
    }
    unmeasured = max(decode.values(), default=estimate.DECODE["jpeg"])
    return {
        "FIXED": {fmt: math.ceil(value * MARGIN / MB) * MB for fmt, value in fixed.items()},
        "DECODE": {fmt: _round_up(decode.get(fmt, unmeasured) * MARGIN) for fmt in estimate.DECODE},
        "ENCODE": {fmt: _round_up(value * MARGIN) for fmt, value in encode.items()},
        "ACCUMULATED": {fmt: _round_up(value * MARGIN) for fmt, value in accumulated.items()},
        "measured_decoders": dict.fromkeys(sorted(decode)),
    }


def _round_up(value: float) -> float:
    return max(0.5, math.ceil(value * 2) / 2)


def apply(constants: dict[str, dict]) -> None:
    from app.render import estimate

    for name in ("FIXED", "DECODE", "ENCODE", "ACCUMULATED"):
        getattr(estimate, name).update(constants[name])


def table(rows: list[dict]) -> str:
    from app.render.estimate import RenderShape, peak_of

    fields = RenderShape.__dataclass_fields__
    lines = ["| source | w | format | output | frames | measured MB | estimated MB | est/meas |",
             "|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["source"], r["w"], r["format"])):
        estimated = peak_of(RenderShape(**{k: row[k] for k in fields}), row["format"])
        row["estimated"] = estimated
        lines.append(f"| {row['source']} | {row['w']} | {row['format']} | {row['output']} | {row['frames']} | "
                     f"{row['measured'] / MB:.0f} | {estimated / MB:.0f} | {estimated / max(row['measured'], 1):.2f} |")
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def load() -> list[dict]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, metavar=("PATH", "W", "FORMAT"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="only the small sources (a minute or two)")
    parser.add_argument("--fit-only", action="store_true", help="refit the stored results, render nothing")
    parser.add_argument("--only", default="", help="only sources whose name contains this")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return 0
    rows = load()
    done = {(r["source"], r["w"], r["format"]) for r in rows}
    if not args.fit_only:
        for spec in SOURCES:
            if (args.quick and not spec.quick) or args.only not in spec.name:
                continue
            path = generate(spec.name)
            for width in spec.widths:
                for fmt in FORMATS:
                    if (spec.name, width, fmt) in done:
                        continue
                    measured = measure(path, width, fmt)
                    row = {"source": spec.name, "w": width, "format": fmt, **measured, **shape_of(path, width, fmt)}
                    rows.append(row)
                    RESULTS.write_text(json.dumps(rows, indent=1))
                    print(f"# {spec.name} w={width} {fmt}: {row['measured'] / MB:.0f} MB, "
                          f"{row['cpu_s']} s CPU", file=sys.stderr, flush=True)
    constants = fit(rows)
    apply(constants)
    for name in ("FIXED", "DECODE", "ENCODE", "ACCUMULATED"):
        print(f"{name} = {constants[name]}")
    print(f"(decoders measured: {', '.join(constants['measured_decoders'])}; the others take the largest)")
    print()
    print(table(rows))
    under = [r for r in rows if r["estimated"] < r["measured"]]
    print(f"\n{len(rows)} renders, {len(under)} under-estimated; machine: {os.cpu_count()} cores")
    return 1 if under else 0


if __name__ == "__main__":
    raise SystemExit(main())
