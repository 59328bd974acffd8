"""estimate_peak: from the header only, never below what a render really takes."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from app.errors import BadSource, SourceTooLarge
from app.render import AutoQuality, RenderOptions
from app.render.estimate import AUTO_QUALITY, estimate_peak, render_shape

ROOT = Path(__file__).resolve().parents[2]
MB = 1024 * 1024


def noisy(size: tuple[int, int], mode: str = "RGB", seed: int = 1) -> Image.Image:
    rng = random.Random(seed)
    image = Image.frombytes(mode, size, rng.randbytes(size[0] * size[1] * len(mode if mode != "P" else "P")))
    if mode == "P":
        image.putpalette(bytes(rng.randrange(256) for _ in range(768)))
    return image


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def gif_animation(frames: int, size: tuple[int, int]) -> bytes:
    images = [noisy(size, "P", seed) for seed in range(frames)]
    return encoded(images[0], "GIF", save_all=True, append_images=images[1:], duration=40, loop=0)


def measured_peak(tmp_path: Path, data: bytes, width: int, fmt: str) -> float:
    """Peak RSS of one render above the process's baseline, in a fresh process (MB)."""
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    result = subprocess.run(
        [sys.executable, "-m", "tests.peak_rss", str(source), str(width), fmt],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)["render_mb"]


CASES = [
    ("noisy 4 MP JPEG, w=0, AVIF", lambda: encoded(noisy((2400, 1600)), "JPEG", quality=85), 0, "avif"),
    ("noisy 4 MP JPEG, w=0, WebP", lambda: encoded(noisy((2400, 1600)), "JPEG", quality=85), 0, "webp"),
    ("noisy 4 MP PNG, w=640, WebP", lambda: encoded(noisy((2400, 1600)), "PNG", compress_level=1), 640, "webp"),
    ("palette 4 MP PNG, w=0, AVIF", lambda: encoded(noisy((2400, 1600), "P"), "PNG", compress_level=1), 0, "avif"),
    ("GIF, 60 frames of 300x300, w=0, AVIF", lambda: gif_animation(60, (300, 300)), 0, "avif"),
    ("GIF, 60 frames of 300x300, w=0, WebP", lambda: gif_animation(60, (300, 300)), 0, "webp"),
]


@pytest.mark.parametrize(("data", "width", "fmt"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_the_estimate_is_at_least_the_measured_peak(tmp_path, data, width, fmt):
    source = data()
    estimate = estimate_peak(source, RenderOptions(width=width, quality=75, format=fmt)) / MB
    measured = measured_peak(tmp_path, source, width, fmt)
    assert measured > 5, "the measurement saw no render at all"
    assert estimate >= measured, f"estimated {estimate:.0f} MB, measured {measured:.0f} MB"
    assert estimate <= 3 * measured + 30, f"estimated {estimate:.0f} MB, measured {measured:.0f} MB: far too high"


@pytest.mark.parametrize("fmt", ["webp", "avif"])
@pytest.mark.parametrize("kind", ["JPEG", "PNG"])
def test_the_estimate_grows_with_the_pixels(kind, fmt):
    estimates = []
    for side in (100, 400, 1000, 2000):
        data = encoded(Image.new("RGB", (side * 3 // 2, side), (10, 20, 30)), kind)
        estimates.append(estimate_peak(data, RenderOptions(width=0, quality=75, format=fmt)))
    assert estimates == sorted(estimates) and len(set(estimates)) == len(estimates), estimates


def test_the_estimate_grows_with_the_frames():
    few, many = gif_animation(5, (64, 64)), gif_animation(50, (64, 64))
    options = RenderOptions(width=0, quality=75, format="webp")
    assert estimate_peak(many, options) > estimate_peak(few, options)


def test_a_jpeg_is_estimated_at_the_draft_scale_the_render_uses():
    data = encoded(Image.new("RGB", (4000, 3000), (200, 100, 50)), "JPEG")
    shape = render_shape(data, RenderOptions(width=640, quality=75, format="webp"))
    # The draft margin per format (app/render/decode.py): WebP 1/4 (1000 px >= 1.25 x 640),
    # AVIF 1/2 (2000 px >= 2 x 640).
    assert shape.decoded_pixels == 1000 * 750
    assert shape.output_pixels == 640 * 480
    avif = render_shape(data, RenderOptions(width=640, quality=75, format="avif"))
    assert avif.decoded_pixels == 2000 * 1500
    full = estimate_peak(data, RenderOptions(width=0, quality=75, format="webp"))
    small = estimate_peak(data, RenderOptions(width=640, quality=75, format="webp"))
    assert small < full / 4


def test_what_render_refuses_from_the_header_the_estimate_refuses_the_same_way(corpus):
    options = RenderOptions(width=0, quality=75, format="webp")
    with pytest.raises(SourceTooLarge):
        estimate_peak((corpus / "edge" / "bomb_png_100k.png").read_bytes(), options)
    with pytest.raises(SourceTooLarge):
        estimate_peak((corpus / "edge" / "bomb_gif_screen.gif").read_bytes(), options)
    with pytest.raises(BadSource):
        estimate_peak(b"<svg xmlns='http://www.w3.org/2000/svg'/>", options)


def test_q_auto_adds_the_search_to_the_estimate():
    buffer = io.BytesIO()
    Image.new("RGB", (800, 600), (10, 20, 30)).save(buffer, "PNG")
    fixed = estimate_peak(buffer.getvalue(), RenderOptions(width=400, quality=75, format="webp"))
    auto = estimate_peak(buffer.getvalue(), RenderOptions(width=400, quality=AutoQuality(70.0), format="webp"))
    assert abs(auto - fixed - AUTO_QUALITY * 400 * 300) <= 1
