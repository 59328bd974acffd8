"""Hostile and awkward sources: every edge-corpus file gets the status its MANIFEST names, bombs
are refused before pixels are allocated, and peak memory for a 48 MP source stays bounded.

The pixel fidelity of the 200 rows is tested in test_edge_fidelity.py; here only the status,
the error message and the absence of a 500.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import ROOT
from tests.upstream import corpus_dir

EDGE = corpus_dir() / "edge"


def manifest_rows() -> dict[str, int]:
    """file name -> the status MANIFEST.md says a correct proxy answers (the first one named)."""
    rows: dict[str, int] = {}
    for line in (EDGE / "MANIFEST.md").read_text().splitlines():
        match = re.fullmatch(r"\| `([^`]+)` \([0-9,]+ B\) \|[^|]*\| *([0-9]{3})\b.*\|", line.strip())
        if match:
            rows[match.group(1)] = int(match.group(2))
    return rows


MANIFEST = manifest_rows()

#: What the error says for each refused file: a reason a person can act on.
REASONS = {
    "bad_crc.png": "not a valid PNG",
    "bomb_gif_screen.gif": "over the 50 MP limit",
    "bomb_jpeg_header.jpg": "over the 50 MP limit",
    "bomb_png_100k.png": "over the 50 MP limit",
    "empty.jpg": "empty",
    "frames_1000.gif": "1000 frames, over the 300-frame limit",
    "page.html": "HTML page, not an image",
    "random.bin": "not a supported image",
    "solid_56mp.png": "56.0 MP, over the 50 MP limit",
    "text.jpg": "not a supported image",
    "truncated.jpg": "truncated",
    "vector.svg": "SVG is not a supported input",
}


def test_manifest_names_every_file_in_the_edge_corpus():
    files = {p.name for p in EDGE.iterdir() if p.name != "MANIFEST.md"}
    assert set(MANIFEST) == files
    assert {name for name, status in MANIFEST.items() if status != 200} == set(REASONS)


def get_edge(client, name: str, **params: str):
    query = "&".join(f"{k}={v}" for k, v in params.items())
    url = quote(f"http://127.0.0.1:{client.upstream_port}/edge/{name}", safe="")
    return client.get(f"/image?url={url}&{query}")


@pytest.fixture
def edge_client(client, upstream):
    client.upstream_port = upstream.port
    return client


@pytest.mark.parametrize("fmt", ["webp", "avif"])
@pytest.mark.parametrize("name", sorted(MANIFEST), ids=sorted(MANIFEST))
def test_edge_file_gets_the_status_its_manifest_names(edge_client, name, fmt):
    response = get_edge(edge_client, name, w="640", format=fmt)
    expected = MANIFEST[name]
    assert response.status_code == expected, response.get_data(as_text=True)[:300]
    if expected == 200:
        assert response.content_type == f"image/{fmt}"
        return
    assert response.content_type == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    assert REASONS[name] in response.json["error"]


def test_html_source_is_never_echoed_back(edge_client):
    page = (EDGE / "page.html").read_bytes()
    response = get_edge(edge_client, "page.html")
    assert response.status_code == 400
    assert page not in response.get_data()
    assert b"<" not in response.get_data()
    assert response.headers["X-Content-Type-Options"] == "nosniff"


# -- bombs, under an address-space limit -------------------------------------------------

#: Runs in a fresh process: warm up every codec, then cap the address space at what is
#: mapped now plus 256 MiB, so any large allocation fails loudly (MemoryError) instead of
#: quietly succeeding on a big machine. Each bomb runs with the real limits and, as the
#: control that shows the cap bites, with the pixel check switched off.
BOMB_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from app.errors import ProxyError
    from app.render import RenderOptions, render

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    edge = Path(sys.argv[1])
    for fmt in ("webp", "avif"):
        render((edge / "one_pixel.png").read_bytes(), RenderOptions(width=0, quality=75, format=fmt))
    cap = status("VmSize") + 256 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    for name in sys.argv[2:]:
        for checked in (True, False):
            options = RenderOptions(width=0, quality=75, format="webp",
                                    max_pixels=50_000_000 if checked else 10**13,
                                    max_frames=300 if checked else 10**6)
            before = status("VmHWM")
            try:
                render((edge / name).read_bytes(), options)
                outcome = {"status": 200, "error": ""}
            except ProxyError as exc:
                outcome = {"status": exc.status, "error": exc.message}
            except BaseException as exc:
                outcome = {"status": "crash", "error": f"{type(exc).__name__}: {exc}"}
            grew = (status("VmHWM") - before) / 2**20
            print(json.dumps({"name": name, "checked": checked, "grew_mb": grew, **outcome}))
    """
)

BOMBS = ["bomb_png_100k.png", "bomb_gif_screen.gif", "bomb_jpeg_header.jpg"]


@pytest.fixture(scope="module")
def bomb_outcomes() -> dict[tuple[str, bool], dict]:
    result = subprocess.run(
        [sys.executable, "-c", BOMB_PROBE, str(EDGE), *BOMBS, "frames_1000.gif"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return {(row["name"], row["checked"]): row for row in rows}


@pytest.mark.parametrize("name", BOMBS)
def test_decompression_bomb_is_refused_from_its_header_before_pixels_are_allocated(bomb_outcomes, name):
    refused = bomb_outcomes[(name, True)]
    assert refused["status"] == 400
    assert "over the 50 MP limit" in refused["error"]
    assert refused["grew_mb"] < 16, f"{refused['grew_mb']:.0f} MB allocated while refusing"
    # The control: without the header check the same file does try a huge allocation, and
    # the address-space cap turns it into a refusal rather than a crash: a 503 (the
    # machine's memory, not stored), which is why the header check must answer first.
    unchecked = bomb_outcomes[(name, False)]
    assert unchecked["status"] == 503
    assert "memory" in unchecked["error"].lower()


def test_animation_over_the_frame_limit_is_refused_before_any_frame_is_decoded(bomb_outcomes):
    refused = bomb_outcomes[("frames_1000.gif", True)]
    assert refused["status"] == 400
    assert "1000 frames" in refused["error"]
    assert refused["grew_mb"] < 16


# -- peak memory for a 48 MP source --------------------------------------------------------


def peak_rss(source: Path, width: int, fmt: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "tests.peak_rss", str(source), str(width), fmt],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def jpeg_48mp(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("big") / "gradient_48mp.jpg"
    Image.linear_gradient("L").resize((8000, 6000)).convert("RGB").save(path, quality=85)
    return path


def test_48mp_png_at_w640_holds_one_decoded_copy_at_most(corpus):
    # A PNG cannot be decoded at reduced scale: one 8000x6000 RGB(X) buffer is 192 MB. A
    # second full-size copy anywhere in the pipeline would double it.
    measured = peak_rss(corpus / "edge" / "solid_48mp.png", 640, "webp")
    assert measured["output"] == "640x480"
    assert measured["render_mb"] < 1.5 * 192, measured


def test_48mp_jpeg_at_w640_is_decoded_at_reduced_scale(jpeg_48mp):
    # draft() decodes at 1/4 (2000x1500, 12 MB) for a 640 target; a full decode would be 192 MB.
    measured = peak_rss(jpeg_48mp, 640, "webp")
    assert measured["output"] == "640x480"
    assert measured["render_mb"] < 64, measured
