"""Image fidelity through /image: every edge-corpus file the MANIFEST expects a 200 for, and every
photo, as WebP and AVIF. Checks size, alpha, frames, durations and loop count, orientation against
the upright marker, colour error (mean CIEDE2000 against the colour-managed source), metadata, and
that the outputs decode in the independent Debian decoders (dwebp/webpinfo/webpmux, avifdec).

Colour bounds, measured with tests/colour.py at q=75 (docs/fidelity-table.md has every number):
edge files at w=0 reach mean dE00 <= 1.0 (bound 1.5); photos at w=640 reach <= 2.5 (bound 3.0),
where the error is the codec's loss on texture, not a colour shift (a profile ignored costs 4-12).
"""

from __future__ import annotations

import functools
import io
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pillow_avif  # noqa: F401  (AVIF decoding)
import pytest
from PIL import Image

from app.render import RenderOptions, render
from tests.colour import delta_e_2000, flatten_on_white, srgb_lab, srgb_reference
from tests.upstream import corpus_dir

CORPUS = corpus_dir()
FORMATS = ("webp", "avif")
EDGE_BOUND = 1.5
PHOTO_BOUND = 3.0
PHOTO_WIDTH = 640
PRIVATE_MARKERS = (b"Exif", b"GPS", b"xmpmeta", b"Private Person", b"private comment", b"ExampleCam")


def manifest_200_files() -> list[str]:
    """Files whose MANIFEST row says a correct proxy answers 200."""
    rows = re.findall(
        r"^\| `([^`]+)` \([^)]*\) \| [^|]* \| ([^|]*) \|$", (CORPUS / "edge" / "MANIFEST.md").read_text(), re.M
    )
    return sorted(name for name, expect in rows if expect.strip().startswith("200"))


# -- what each file must come out as ----------------------------------------------------------


def _ramp(values: np.ndarray) -> bool:
    return values[0] < 16 and values[-1] > 239 and bool(np.all(np.diff(values.astype(int)) >= -8))


def gray16_is_a_black_to_white_ramp(out: Image.Image) -> None:
    row = np.asarray(out.convert("L"))[32]
    assert _ramp(row), f"not a black-to-white ramp: {row[::32]}"


def rgb16_keeps_its_gradients(out: Image.Image) -> None:
    rgb = np.asarray(out.convert("RGB")).astype(int)
    assert _ramp(rgb[32, :, 0]) and _ramp(255 - rgb[32, :, 1]), "red/green ramps clipped"
    column = rgb[:, 128, 2]
    assert column[1] < 16 and column[-2] > 230, f"blue ramp along y clipped: {column[::8]}"


def palette_corners_are_transparent(out: Image.Image) -> None:
    alpha = np.asarray(out.convert("RGBA"))[..., 3]
    corners = [alpha[1, 1], alpha[1, -2], alpha[-2, 1], alpha[-2, -2]]
    assert max(corners) < 16 and alpha[60, 80] > 240, f"corners {corners}, centre {alpha[60, 80]}"


def alpha_ramp_is_kept(out: Image.Image) -> None:
    alpha = np.asarray(out.convert("RGBA"))[..., 3]
    assert alpha.min() < 16 and alpha.max() > 239, f"alpha range {alpha.min()}..{alpha.max()}"


def gray_alpha_stays_gray_with_its_alpha(out: Image.Image) -> None:
    alpha_ramp_is_kept(out)
    rgba = np.asarray(out.convert("RGBA")).astype(int)
    opaque = rgba[..., 3] > 128
    spread = (rgba[..., :3].max(axis=-1) - rgba[..., :3].min(axis=-1))[opaque]
    assert spread.max() <= 12, f"gray source came out coloured (channel spread {spread.max()})"


def is_gray(out: Image.Image) -> None:
    rgb = np.asarray(out.convert("RGB")).astype(int)
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    assert spread.max() <= 12, f"gray source came out coloured (channel spread {spread.max()})"


def diagonal_is_black_on_white(out: Image.Image) -> None:
    gray = np.asarray(out.convert("L")).astype(int)
    assert gray[60, 100] < 64 and gray[110, 10] > 200 and gray[10, 190] > 200


#: Block centres of the upright marker (120x80): red top-left, green top-right, blue bottom-left.
MARKER_SAMPLES = {(15, 10): (255, 0, 0), (105, 10): (0, 255, 0), (15, 70): (0, 0, 255), (105, 70): (255, 255, 255)}


def is_upright_marker(out: Image.Image) -> None:
    rgb = out.convert("RGB")
    for (x, y), want in MARKER_SAMPLES.items():
        got = rgb.getpixel((x, y))
        assert all(abs(g - w) <= 48 for g, w in zip(got, want, strict=True)), f"({x},{y}) is {got}, want {want}"


@dataclass(frozen=True)
class Case:
    size: tuple[int, int]  # output size at w
    w: int = 0
    alpha: bool = False
    frames: int = 1
    durations: tuple[int, ...] = ()
    loop: int | None = None
    colour_bound: float | None = EDGE_BOUND
    check: object = field(default=None)


ANIMATION = {"frames": 6, "durations": (100, 200, 300, 100, 50, 500), "loop": 3}
PATCHES = (240, 160)
EDGE: dict[str, Case] = {
    "adobergb_profile.png": Case(PATCHES),
    "alpha.avif": Case(PATCHES, alpha=True, check=alpha_ramp_is_kept),
    "animated.gif": Case((80, 50), w=80, **ANIMATION),
    "animated.png": Case((80, 50), w=80, **ANIMATION),
    "animated.webp": Case((80, 50), w=80, **ANIMATION),
    "bilevel.png": Case((200, 120), check=diagonal_is_black_on_white),
    "cmyk_noprofile.jpg": Case(PATCHES),
    "cmyk_profile.jpg": Case(PATCHES),
    "exif_gps_xmp.jpg": Case(PATCHES),
    "gray16.png": Case((256, 64), check=gray16_is_a_black_to_white_ramp),
    "gray_alpha.png": Case((200, 100), alpha=True, check=gray_alpha_stays_gray_with_its_alpha),
    "grayscale.jpg": Case(PATCHES, check=is_gray),
    "jpeg_named.png": Case(PATCHES),
    "lossless_alpha.webp": Case(PATCHES, alpha=True, check=alpha_ramp_is_kept),
    "one_pixel.png": Case((1, 1), w=640),
    "palette_trns.png": Case((160, 120), alpha=True, check=palette_corners_are_transparent),
    "plain.bmp": Case(PATCHES),
    "plain.tiff": Case(PATCHES),
    "progressive.jpg": Case(PATCHES),
    "prophoto_profile.jpg": Case(PATCHES),
    "rgb16.png": Case((256, 64), check=rgb16_keeps_its_gradients),
    "solid_48mp.png": Case((640, 480), w=640, colour_bound=None),  # one flat colour; its reference costs 4 s
    "still.avif": Case(PATCHES),
    "tall_1x4000.png": Case((1, 4000), w=640),
    "wide_4000x1.png": Case((640, 1), w=640),
    **{f"orientation_{o}.jpg": Case((120, 80), check=is_upright_marker) for o in range(1, 9)},
}
PHOTOS = sorted(p.name for p in (CORPUS / "photos").iterdir() if p.suffix in (".jpg", ".png"))
PHOTO_ALPHA = {"phone_screenshot_rgba_706x1442.png"}


# -- fetching, decoding -----------------------------------------------------------------------


def image_path(upstream, path: str, w: int, fmt: str) -> str:
    return f"/image?url={quote(upstream.url(path), safe='')}&w={w}&format={fmt}"


_outputs: dict[tuple[str, int, str], bytes] = {}


def fetch(client, upstream, path: str, w: int, fmt: str) -> bytes:
    """The proxy's output, fetched once per (path, w, fmt) for this module's tests."""
    key = (path, w, fmt)
    if key not in _outputs:
        response = client.get(image_path(upstream, path, w, fmt))
        assert response.status_code == 200, response.get_data()[:300]
        assert response.headers["Content-Type"] == f"image/{fmt}"
        _outputs[key] = response.get_data()
    return _outputs[key]


def decode(body: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(body))
    image.load()
    return image


def frames_of(image: Image.Image) -> tuple[list[int], list[tuple[int, int]]]:
    durations, sizes = [], []
    for index in range(getattr(image, "n_frames", 1)):
        image.seek(index)
        image.load()
        durations.append(int(image.info.get("duration", 0)))
        sizes.append(image.size)
    image.seek(0)
    return durations, sizes


@functools.lru_cache(maxsize=4)
def reference_lab(path: str, size: tuple[int, int]) -> np.ndarray:
    return srgb_lab(np.asarray(srgb_reference((CORPUS / path).read_bytes(), size)))


def mean_delta_e(path: str, out: Image.Image) -> float:
    out_lab = srgb_lab(np.asarray(flatten_on_white(out)))
    return float(np.mean(delta_e_2000(reference_lab(path, out.size), out_lab)))


def carries_no_metadata(body: bytes, fmt: str) -> None:
    for marker in PRIVATE_MARKERS:
        assert marker not in body, f"output carries {marker!r}"
    # No ICC profile: the pixels are sRGB already, and an untagged image is shown as sRGB.
    if fmt == "webp":
        assert b"ICCP" not in body
    else:
        assert b"colrprof" not in body and b"colrrICC" not in body


# -- the tests --------------------------------------------------------------------------------


def test_every_manifest_200_file_has_an_expectation():
    assert set(manifest_200_files()) == set(EDGE)


# Both formats of one file run back to back, so its colour reference is computed once.
@pytest.mark.parametrize(("name", "fmt"), [pytest.param(n, f, id=f"{n}-{f}") for n in sorted(EDGE) for f in FORMATS])
def test_edge_file_comes_out_faithful(client, upstream, name, fmt):
    case = EDGE[name]
    body = fetch(client, upstream, f"edge/{name}", case.w, fmt)
    out = decode(body)
    assert out.size == case.size
    assert ("A" in out.mode) == case.alpha, f"mode {out.mode}: alpha {'lost' if case.alpha else 'invented'}"
    durations, sizes = frames_of(out)
    assert len(durations) == case.frames
    if case.frames > 1:
        assert tuple(durations) == case.durations
        assert set(sizes) == {case.size}
        if fmt == "webp":  # pillow-avif-plugin 1.6 cannot write an AVIF loop count (README)
            assert out.info.get("loop") == case.loop
    if case.check is not None:
        case.check(out)  # type: ignore[operator]
    if case.colour_bound is not None and min(case.size) > 1:
        assert mean_delta_e(f"edge/{name}", out) <= case.colour_bound
    carries_no_metadata(body, fmt)


@pytest.mark.parametrize(("photo", "fmt"), [pytest.param(p, f, id=f"{p}-{f}") for p in PHOTOS for f in FORMATS])
def test_photo_comes_out_faithful(client, upstream, photo, fmt):
    body = fetch(client, upstream, f"photos/{photo}", PHOTO_WIDTH, fmt)
    out = decode(body)
    display_w, display_h = map(int, re.search(r"_(\d+)x(\d+)\.", photo).groups())  # type: ignore[union-attr]
    assert out.size == (PHOTO_WIDTH, round(display_h * PHOTO_WIDTH / display_w))
    assert ("A" in out.mode) == (photo in PHOTO_ALPHA)
    assert mean_delta_e(f"photos/{photo}", out) <= PHOTO_BOUND
    carries_no_metadata(body, fmt)


def test_metadata_check_sees_the_source_markers():
    source = (CORPUS / "edge" / "exif_gps_xmp.jpg").read_bytes()
    assert all(marker in source for marker in (b"Exif", b"xmpmeta", b"Private Person"))


def test_colour_check_catches_an_ignored_profile():
    """Without this, a bound that no mistake can exceed would pass vacuously."""
    source = Image.open(CORPUS / "edge" / "prophoto_profile.jpg").convert("RGB")  # pixels as if untagged
    error = float(
        np.mean(delta_e_2000(reference_lab("edge/prophoto_profile.jpg", source.size), srgb_lab(np.asarray(source))))
    )
    assert error > 3 * EDGE_BOUND


# -- tiny and extreme shapes (AVIF's minimum-size and odd-size quirks) -------------------------


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize(size).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


SHAPES = [
    ((1, 1), 0, (1, 1)),
    ((1, 4000), 0, (1, 4000)),
    ((4000, 1), 0, (4000, 1)),
    ((4000, 1), 640, (640, 1)),
    ((10000, 10), 0, (10000, 10)),
    ((10000, 10), 640, (640, 1)),
    ((10, 10000), 0, (10, 10000)),
    ((10, 10000), 5, (5, 5000)),
    ((3, 3), 2, (2, 2)),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("source", "w", "want"), SHAPES, ids=[f"{s[0]}x{s[1]}-w{w}" for s, w, _ in SHAPES])
def test_extreme_shape_gives_valid_output_of_the_right_size(source, w, want, fmt, decoders, tmp_path):
    body = render(_png(source), RenderOptions(width=w, quality=75, format=fmt)).body
    assert decode(body).size == want
    assert decoders.size(body, fmt, tmp_path) == want


# -- independent decoders ---------------------------------------------------------------------

DEBIAN_TOOLS = {"dwebp": "webp", "webpinfo": "webp", "webpmux": "webp", "avifdec": "libavif-bin"}


class Decoders:
    """Debian's libwebp and libavif command-line tools (dav1d/aom decoders, not Pillow's)."""

    def size(self, body: bytes, fmt: str, tmp: Path) -> tuple[int, int]:
        path = tmp / f"out.{fmt}"
        path.write_bytes(body)
        if fmt == "avif":
            info = self._run("avifdec", "--info", str(path))
            width, height = re.search(r"Resolution\s*:\s*(\d+)x(\d+)", info).groups()  # type: ignore[union-attr]
            self._run("avifdec", str(path), str(tmp / "out.png"))
            return int(width), int(height)
        info = self.webpinfo(body, tmp)
        assert "No error detected" in info, info
        if b"ANIM" in body[:64]:
            mux = self._run("webpmux", "-info", str(path))
            width, height = re.search(r"Canvas size: (\d+) x (\d+)", mux).groups()  # type: ignore[union-attr]
            return int(width), int(height)
        self._run("dwebp", str(path), "-pam", "-o", str(tmp / "out.pam"))
        header = (tmp / "out.pam").read_bytes()[:200].decode("ascii", "replace")
        width, height = re.search(r"WIDTH (\d+)\nHEIGHT (\d+)", header).groups()  # type: ignore[union-attr]
        return int(width), int(height)

    def animation(self, body: bytes, fmt: str, tmp: Path) -> tuple[int, list[int], int | None]:
        """(frames, durations in ms, loop count or None when the tool does not show it)."""
        path = tmp / f"anim.{fmt}"
        path.write_bytes(body)
        if fmt == "avif":
            info = self._run("avifdec", "--info", str(path))
            durations = [round(float(d) * 1000) for d in re.findall(r"\[duration ([0-9.]+)", info)]
            return len(durations), durations, None
        mux = self._run("webpmux", "-info", str(path))
        rows = re.findall(r"^\s*\d+:\s+\d+\s+\d+\s+\w+\s+-?\d+\s+-?\d+\s+(\d+)", mux, re.M)
        loop = re.search(r"Loop Count\s*:\s*(\d+)", mux)
        return len(rows), [int(d) for d in rows], int(loop.group(1)) if loop else None

    def webpinfo(self, body: bytes, tmp: Path) -> str:
        path = tmp / "info.webp"
        path.write_bytes(body)
        return self._run("webpinfo", str(path))

    def _run(self, *command: str) -> str:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, f"{command[0]} failed ({result.returncode}): {result.stderr[-500:]}"
        return result.stdout + result.stderr


def _install(packages: list[str]) -> str:
    """apt-get install the packages; the reason it failed, or '' on success."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    for attempt in (
        ["apt-get", "install", "-y", *packages],
        ["apt-get", "update"],
        ["apt-get", "install", "-y", *packages],
    ):
        done = subprocess.run(attempt, capture_output=True, text=True, timeout=600, check=False)
        if attempt[1] == "install" and done.returncode == 0:
            return ""
    return f"apt-get install {' '.join(packages)} failed: {done.stderr.strip()[-300:]}"


@pytest.fixture(scope="session")
def decoders() -> Decoders:
    missing = sorted({package for tool, package in DEBIAN_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        reason = _install(missing)
        still = [tool for tool in DEBIAN_TOOLS if shutil.which(tool) is None]
        if still:
            pytest.skip(f"independent decoders {', '.join(still)} unavailable and not installable: {reason}")
    return Decoders()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("path", "w"),
    [(f"edge/{name}", case.w) for name, case in sorted(EDGE.items())] + [(f"photos/{p}", PHOTO_WIDTH) for p in PHOTOS],
)
def test_output_decodes_in_the_independent_decoder(client, upstream, decoders, tmp_path, path, w, fmt):
    body = fetch(client, upstream, path, w, fmt)
    pillow = decode(body)
    assert decoders.size(body, fmt, tmp_path) == pillow.size
    if getattr(pillow, "n_frames", 1) > 1:
        frames, durations, loop = decoders.animation(body, fmt, tmp_path)
        pillow_durations, _ = frames_of(pillow)
        assert (frames, durations) == (len(pillow_durations), pillow_durations)
        if fmt == "webp":
            assert loop == pillow.info["loop"]


# -- transparency in animations ---------------------------------------------------------------


def _transparent_gif(disposal: int) -> bytes:
    """A square moving over a transparent background: opaque inside each frame's changed rectangle."""
    frames = []
    for index in range(4):
        frame = Image.new("P", (60, 40), 0)
        frame.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
        frame.paste(1 + index % 2, (index * 10, 10, index * 10 + 10, 20))
        frames.append(frame)
    buffer = io.BytesIO()
    frames[0].save(
        buffer, "GIF", save_all=True, append_images=frames[1:], duration=[40, 80, 120, 160], loop=0,
        transparency=0, disposal=disposal,
    )  # fmt: skip
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("disposal", [1, 2], ids=["keep", "to-background"])
def test_transparent_animation_keeps_its_transparency(fmt, disposal, decoders, tmp_path):
    body = render(_transparent_gif(disposal), RenderOptions(width=0, quality=75, format=fmt)).body
    out = decode(body)
    assert out.mode == "RGBA"
    durations, _ = frames_of(out)
    assert durations == [40, 80, 120, 160]
    for index in range(4):
        out.seek(index)
        rgba = out.convert("RGBA")
        assert rgba.getpixel((55, 35))[3] < 16, f"frame {index}: background not transparent"
        square = rgba.getpixel((index * 10 + 5, 15))
        assert square[3] > 240 and max(square[:3]) > 200, f"frame {index}: square is {square}"
        first_square = rgba.getpixel((5, 15))[3]
        # disposal 1 leaves the first square in place; disposal 2 clears it before the next frame.
        assert (first_square > 240) if (disposal == 1 or index == 0) else (first_square < 16)
    if fmt == "webp":  # the container says so too, so decoders that trust its flag keep the alpha
        assert re.search(r"^\s*Alpha: 1$", decoders.webpinfo(body, tmp_path), re.M)


# -- format=auto ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        ("image/avif,image/webp,*/*", "image/avif"),
        ("image/webp,*/*", "image/webp"),
        ("*/*", "image/webp"),
        ("", "image/webp"),
    ],
    ids=["avif-named", "webp-only", "bare-star", "no-accept"],
)
def test_format_auto_picks_avif_only_when_accept_names_it(client, upstream, accept, content_type):
    response = client.get(image_path(upstream, "edge/plain.bmp", 64, "auto"), headers={"Accept": accept})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == content_type
    assert response.headers["Vary"] == "Accept"
    assert decode(response.get_data()).format == content_type.split("/")[1].upper()


def test_format_auto_variants_are_cached_apart(client, upstream):
    path = image_path(upstream, "edge/progressive.jpg", 100, "auto")
    avif = client.get(path, headers={"Accept": "image/avif,*/*"})
    webp = client.get(path, headers={"Accept": "*/*"})
    again = [client.get(path, headers={"Accept": a}) for a in ("image/avif,*/*", "*/*")]
    assert [r.headers["X-Cache"] for r in again] == ["HIT", "HIT"]
    assert again[0].get_data() == avif.get_data() != webp.get_data() == again[1].get_data()
    assert again[0].headers["Content-Type"] == "image/avif" and again[1].headers["Content-Type"] == "image/webp"
