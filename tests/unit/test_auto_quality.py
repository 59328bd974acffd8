"""q=auto: the metric against the reference package, the search, and the render it drives."""

from __future__ import annotations

import importlib
import io

import numpy as np
import pillow_avif  # noqa: F401
import pytest
from PIL import Image

from app.image.quality_meta import AUTO_QUALITY, quality_meta
from app.image.serve import Served
from app.image.views import image_headers
from app.render import AutoQuality, RenderOptions, render
from app.render.auto_quality import CLOSE, MAX_ENCODES, START, TOLERANCE, TOP, flatten, search
from app.render.ssimulacra2 import Reference, ssimulacra2

# app.render re-exports the encode() step under the module's name.
encode_module = importlib.import_module("app.render.encode")


def photo_like(width: int = 256, height: int = 192, seed: int = 1, mode: str = "RGB") -> Image.Image:
    """Smooth colour fields, edges and fine noise: enough detail for q to matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 50 * np.sin(x / 17), 128 + 40 * np.cos(y / 11), 128 + 30 * np.sin((x + y) / 23)], -1)
    base[(x // 32 + y // 32) % 2 == 0] *= 0.8
    grain = rng.normal(0, 6, (height, width, 1))  # luma grain: chroma noise no 4:2:0 codec keeps
    pixels = np.clip(base + grain, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray(np.where(x < width / 2, 255, 90).astype(np.uint8), "L")
        image.putalpha(alpha)
    elif mode == "L":
        image = image.convert("L")
    return image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def encoded(image: Image.Image, **arguments: object) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, **arguments)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


# -- the metric -------------------------------------------------------------------------------
# Every metric test runs on both implementations: the compiled one and the NumPy port that
# stands in where it could not be built.

metric_module = importlib.import_module("app.render.ssimulacra2")
IMPLEMENTATIONS = ["app.render._ssimulacra2", "app.render._ssimulacra2_numpy"]


@pytest.fixture(params=IMPLEMENTATIONS, ids=["compiled", "numpy"])
def implementation(request, monkeypatch):
    module = importlib.import_module(request.param)
    monkeypatch.setattr(metric_module, "IMPLEMENTATION", module)
    return module


def test_the_compiled_metric_is_built_and_used():
    """setup.py builds it wherever a C compiler is (here and in CI); the fallback is for elsewhere."""
    assert metric_module.IMPLEMENTATION.__name__ == "app.render._ssimulacra2"


@pytest.mark.parametrize(("size", "quality"), [((256, 192), 30), ((97, 61), 80), ((300, 40), 60)])
def test_metric_agrees_with_the_reference_package(size, quality, implementation):
    reference_package = pytest.importorskip("ssimulacra2")  # requirements-dev.txt installs it
    reference = photo_like(*size)
    distorted = encoded(reference, format="WEBP", quality=quality)
    buffers = []
    for image in (reference, distorted):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        buffer.seek(0)
        buffers.append(buffer)
    expected = reference_package.compute_ssimulacra2(*buffers)
    assert ssimulacra2(reference, distorted) == pytest.approx(expected, abs=0.01)


def test_metric_ranks_identical_above_distorted(implementation):
    reference = photo_like()
    assert ssimulacra2(reference, reference) == pytest.approx(100.0)
    assert ssimulacra2(reference, encoded(reference, format="WEBP", quality=90)) > ssimulacra2(
        reference, encoded(reference, format="WEBP", quality=20)
    )


@pytest.mark.parametrize("size", [(8, 8), (9, 15), (17, 8), (640, 9)])
def test_metric_agrees_with_the_reference_package_at_the_smallest_scales(size, implementation):
    """At 8 px a side the metric has one scale; odd sides end the 2x2 averaging at an edge."""
    reference_package = pytest.importorskip("ssimulacra2")
    reference = photo_like(*size, seed=3)
    distorted = encoded(reference, format="WEBP", quality=50)
    expected = reference_package.compute_ssimulacra2(io.BytesIO(png(reference)), io.BytesIO(png(distorted)))
    assert ssimulacra2(reference, distorted) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("size", [(1, 1), (7, 300), (300, 7)])
def test_an_image_under_8_px_a_side_has_no_scale_and_scores_100(size, implementation):
    reference = Reference(photo_like(*size))
    assert reference.scales == 0
    assert reference.score(Image.new("RGB", size, (0, 0, 0))) == 100.0


def test_the_metric_refuses_what_it_cannot_score(implementation):
    reference = Reference(photo_like(64, 48))
    with pytest.raises(ValueError, match="sizes differ"):
        reference.score(photo_like(48, 64))
    with pytest.raises(ValueError, match="RGB"):
        reference.score(photo_like(64, 48, mode="L"))
    compiled = implementation
    with pytest.raises(ValueError, match="bytes of RGB"):
        compiled.Reference(b"\0" * 10, 2, 2)  # 12 expected
    with pytest.raises(ValueError, match="bad size"):
        compiled.Reference(b"", 0, 5)
    prepared = compiled.Reference(bytes(64 * 48 * 3), 64, 48)
    with pytest.raises(ValueError, match="bytes of RGB"):
        prepared.score(bytes(64 * 48 * 3 - 1))


@pytest.mark.parametrize(
    "size", [(1, 1), (1, 9), (9, 1), (8, 8), (8, 9), (9, 8), (15, 17), (16, 16), (33, 7), (7, 33), (64, 65), (130, 9)]
)
def test_compiled_and_numpy_agree_on_noise_of_every_small_shape(size):
    """Random bytes at the shapes where scales, mirrors and odd edges begin and end: the two
    implementations give the same score (and neither crashes)."""
    compiled = importlib.import_module("app.render._ssimulacra2")
    port = importlib.import_module("app.render._ssimulacra2_numpy")
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    width, height = size
    reference = rng.integers(0, 256, width * height * 3, dtype=np.uint8).tobytes()
    distorted = np.clip(np.frombuffer(reference, np.uint8) + rng.integers(-40, 40, width * height * 3), 0, 255)
    distorted_bytes = distorted.astype(np.uint8).tobytes()
    fast = compiled.Reference(reference, width, height)
    slow = port.Reference(reference, width, height)
    assert fast.scales == slow.scales
    assert fast.score(distorted_bytes) == pytest.approx(slow.score(distorted_bytes), abs=0.01)
    assert fast.score(reference) == pytest.approx(100.0)


def test_a_compiled_reference_is_prepared_once():
    compiled = importlib.import_module("app.render._ssimulacra2")
    reference = compiled.Reference(bytes(16 * 16 * 3), 16, 16)
    with pytest.raises(TypeError, match="prepared once"):
        reference.__init__(bytes(8 * 8 * 3), 8, 8)
    assert reference.score(bytes(16 * 16 * 3)) == 100.0
    with pytest.raises(ValueError, match="not prepared"):
        compiled.Reference.__new__(compiled.Reference).score(b"")


def test_threads_scoring_one_reference_at_once_get_the_scores_of_one_at_a_time(implementation):
    """Each score keeps its working set apart (the compiled code runs without the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    image = photo_like(320, 240)
    candidates = [encoded(image, format="WEBP", quality=q) for q in (10, 30, 50, 70, 90) * 4]
    alone = [ssimulacra2(image, candidate) for candidate in candidates]
    reference = Reference(image)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(reference.score, candidates))
    assert together == alone


def test_flatten_puts_transparency_over_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert flatten(image).getpixel((0, 0)) == (255, 255, 255)


# -- the search, with a scripted score curve ------------------------------------------------


class Curve:
    """A monotone score curve q -> score; records every probe."""

    def __init__(self, scores) -> None:  # type: ignore[no-untyped-def]
        self.scores = scores
        self.probes: list[int] = []

    def __call__(self, q: int) -> tuple[bytes, float]:
        self.probes.append(q)
        return bytes([q]), float(self.scores(q))


@pytest.mark.parametrize("target", [30.0, 55.5, 70.0, 84.0, 92.0])
@pytest.mark.parametrize("hint", [None, 10, 60, 95])
def test_search_finds_the_lowest_passing_q_within_the_tolerance_and_the_budget(target, hint):
    curve = Curve(lambda q: 20 + 0.75 * q)  # reaches 95 at q=100
    choice = search(curve, target, hint)
    lowest = next(q for q in range(1, 101) if curve.scores(q) >= target)
    assert choice.score >= target
    assert lowest <= choice.quality
    # The lowest passing q within the tolerance, or a q that passes by less than CLOSE.
    assert choice.quality <= lowest + TOLERANCE or choice.score < target + CLOSE
    assert choice.body == bytes([choice.quality])
    assert len(curve.probes) == len(set(curve.probes)) <= MAX_ENCODES


def test_an_unreachable_target_gets_the_top_quality():
    curve = Curve(lambda q: 40 + 0.3 * q)  # 70 at most
    choice = search(curve, 90.0)
    assert choice.quality == TOP
    assert choice.score == pytest.approx(70.0)
    assert len(curve.probes) <= MAX_ENCODES


def test_a_good_hint_needs_one_probe_and_a_high_one_two():
    curve = Curve(lambda q: 0.8 * q)
    assert search(curve, 60.0, hint=76).quality == 76  # 60.8: passes by less than CLOSE
    assert curve.probes == [76]
    curve = Curve(lambda q: 0.8 * q)
    assert search(curve, 60.0, hint=79).quality == 79  # 63.2: still within CLOSE
    assert curve.probes == [79]
    curve = Curve(lambda q: 0.8 * q)
    choice = search(curve, 60.0, hint=85)  # 68.0 passes by more than CLOSE: a lower q is tried
    assert choice.quality in range(75, 80)  # 75 is the lowest passing q (60.0)
    assert choice.score < 60.0 + CLOSE
    assert len(curve.probes) <= 3


def test_close_enough_never_stops_on_a_failing_candidate():
    curve = Curve(lambda q: 0.8 * q)
    choice = search(curve, 60.0, hint=74)  # 59.2 fails, however close
    assert curve.probes[0] == 74 and len(curve.probes) >= 2
    assert 60.0 <= choice.score < 60.0 + CLOSE and choice.quality >= 75


# -- through render() -----------------------------------------------------------------------


class CountingSave:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.real = encode_module.save
        monkeypatch.setattr(encode_module, "save", self)

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("fmt", ["webp", "avif"])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_render_q_auto_reaches_the_target_in_bounded_encodes(monkeypatch, fmt, mode):
    source = photo_like(mode=mode)
    saves = CountingSave(monkeypatch)
    rendered = render(png(source), RenderOptions(width=200, quality=AutoQuality(75.0), format=fmt))
    assert 1 <= saves.calls <= MAX_ENCODES  # encodes are counted, not timed
    assert rendered.quality_score is not None and rendered.quality_score >= 75.0
    assert 1 <= rendered.quality <= 100
    # Rescore independently: the body served is the candidate that was scored.
    resized = source.convert("RGBA" if mode == "RGBA" else "RGB").resize((200, 150), Image.Resampling.LANCZOS)
    with Image.open(io.BytesIO(rendered.body)) as out:
        assert ssimulacra2(flatten(resized), flatten(out)) >= 75.0 - 1.0


def test_render_q_auto_with_an_unreachable_target_uses_q100(monkeypatch):
    rendered = render(png(photo_like()), RenderOptions(width=200, quality=AutoQuality(100.0), format="webp"))
    assert rendered.quality == 100
    fixed = render(png(photo_like()), RenderOptions(width=200, quality=100, format="webp"))
    assert rendered.body == fixed.body
    assert fixed.quality_score is None


def test_render_q_auto_with_the_right_hint_encodes_at_most_twice(monkeypatch):
    data = png(photo_like())
    first = render(data, RenderOptions(width=200, quality=AutoQuality(75.0), format="webp"))
    saves = CountingSave(monkeypatch)
    again = render(data, RenderOptions(width=200, quality=AutoQuality(75.0), format="webp",
                                       quality_hint=first.quality))
    assert saves.calls <= 2
    assert again.quality <= first.quality


@pytest.mark.parametrize("size", [(7, 40), (120, 5)])
def test_an_output_too_small_to_judge_gets_the_start_quality(monkeypatch, size):
    saves = CountingSave(monkeypatch)
    rendered = render(png(photo_like(*size)), RenderOptions(width=0, quality=AutoQuality(70.0), format="webp"))
    assert rendered.quality == START["webp"] and saves.calls == 1


def test_animation_is_searched_on_its_first_frame_and_encoded_once_more(monkeypatch):
    frames = [photo_like(seed=s) for s in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    saves = CountingSave(monkeypatch)
    rendered = render(buffer.getvalue(), RenderOptions(width=128, quality=AutoQuality(70.0), format="webp"))
    assert rendered.frames == 3
    assert saves.calls <= MAX_ENCODES + 1  # the still candidates, then the animation at the chosen q
    with Image.open(io.BytesIO(rendered.body)) as out:
        assert out.n_frames == 3


# -- the answer -----------------------------------------------------------------------------


def test_x_quality_is_sent_for_q_auto_entries_only():
    from app.cache import CacheEntry
    from app.guard import URLPolicy
    from app.image.params import parse_request
    from app.settings import Settings

    request = parse_request({"url": ["https://example.com/a.jpg"], "q": ["auto"]}, "", Settings(), URLPolicy())
    data = png(photo_like())
    rendered = render(data, RenderOptions(width=64, quality=request.quality, format="webp"))
    auto = CacheEntry(status=200, body=rendered.body, content_type="image/webp", etag='"x"',
                      meta={"source_bytes": len(data), **quality_meta(rendered)})
    headers = dict(image_headers(Served(auto, "MISS"), request))
    assert headers["X-Quality"] == str(rendered.quality) == str(auto.meta[AUTO_QUALITY])
    assert "X-Quality" in headers["Access-Control-Expose-Headers"]

    fixed_render = render(data, RenderOptions(width=64, quality=75, format="webp"))
    assert quality_meta(fixed_render) == {}
    fixed = CacheEntry(status=200, body=fixed_render.body, content_type="image/webp", etag='"y"',
                       meta={"source_bytes": len(data), **quality_meta(fixed_render)})
    assert "X-Quality" not in dict(image_headers(Served(fixed, "MISS"), request))
