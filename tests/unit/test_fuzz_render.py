"""Fuzz render() with mutated corpus files: it returns a Rendered or raises a 400 BadSource,
never anything else (an unexpected exception would be a 500).

Bounded for `make test`: FUZZ_EXAMPLES examples (default 200, derandomized so CI is
repeatable) within FUZZ_DEADLINE_S seconds (default 20; past it the remaining examples pass
without rendering). `make fuzz` runs 20000 random examples for up to 600 s. Every failure a
run finds is saved in tests/fuzz_regressions/ and replayed by the tests below.
"""

from __future__ import annotations

import os
import resource
import struct
import time
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import BadSource, ProxyError
from app.render import Rendered, RenderOptions, render
from tests.upstream import corpus_dir

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
BUDGET_S = float(os.environ.get("FUZZ_DEADLINE_S", "20"))
LONG_RUN = "FUZZ_EXAMPLES" in os.environ
REGRESSIONS = Path(__file__).resolve().parents[1] / "fuzz_regressions"

#: Small seeds keep one example in milliseconds; every input format is among them.
SEEDS: dict[str, bytes] = {
    p.name: p.read_bytes()
    for p in sorted((corpus_dir() / "edge").iterdir())
    if p.name != "MANIFEST.md" and 0 < p.stat().st_size <= 64 * 1024
}

#: Lower limits than production so a mutated header that claims a large canvas is cheap to
#: refuse or to render; the property is the same at any limit.
OPTION_LIMITS = {"max_pixels": 2_000_000, "max_frames": 32}

#: Values that break parsers when written into a size or count field.
FIELD_VALUES = (0, 1, 2, 0x7F, 0x80, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


@st.composite
def mutated_sources(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)), label="seed")])
    for _ in range(draw(st.integers(1, 4), label="mutations")):
        if not data:
            break
        size = len(data)
        # Half the positions fall in the first 64 bytes, where headers and sizes live.
        where = draw(st.one_of(st.integers(0, min(size, 64) - 1), st.integers(0, size - 1)), label="where")
        kind = draw(st.sampled_from(["flip", "truncate", "splice", "field", "repeat", "delete"]), label="kind")
        if kind == "flip":
            data[where] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[where:]
        elif kind == "splice":
            other = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
            start = draw(st.integers(0, max(0, len(other) - 1)))
            data[where:where] = other[start : start + draw(st.integers(1, 256))]
        elif kind == "field":
            value = draw(st.sampled_from(FIELD_VALUES))
            width, order = draw(st.sampled_from([(1, ">"), (2, ">"), (2, "<"), (4, ">"), (4, "<")]))
            packed = struct.pack(order + {1: "B", 2: "H", 4: "I"}[width], value & (2 ** (8 * width) - 1))
            data[where : where + width] = packed
        elif kind == "repeat":
            chunk = data[where : where + draw(st.integers(1, 512))]
            data[where:where] = chunk * draw(st.integers(1, 8))
        else:
            del data[where : where + draw(st.integers(1, 64))]
    return bytes(data)


options_strategy = st.builds(
    RenderOptions,
    width=st.sampled_from([0, 1, 7, 64, 640]),
    quality=st.sampled_from([1, 50, 100]),
    format=st.sampled_from(["webp", "avif"]),
    **{name: st.just(value) for name, value in OPTION_LIMITS.items()},
)


def check_render(data: bytes, options: RenderOptions) -> None:
    """The property: a Rendered with a body, or a BadSource that is a 400. Running out of
    memory (under the cap below) is a failure too: at these limits no render needs much."""
    try:
        rendered = render(data, options)
    except ProxyError as exc:
        assert isinstance(exc, BadSource), f"{type(exc).__name__}: {exc.message}"
        assert exc.status == 400
        assert exc.message
        assert "more memory" not in exc.message, "a bomb got past the pixel check"
        return
    assert isinstance(rendered, Rendered)
    assert rendered.body
    assert rendered.content_type == f"image/{options.format}"
    assert rendered.width >= 1 and rendered.height >= 1


class _Budget:
    """Stops new work once the time budget is spent, but never while Hypothesis is
    shrinking a failure (skipping then would make the failure look flaky)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started: float | None = None
        self.failed = False

    def spent(self) -> bool:
        now = time.monotonic()
        if self.started is None:
            self.started = now
        return not self.failed and now - self.started > self.seconds


budget = _Budget(BUDGET_S)

#: Address space allowed above what the test process has mapped when the fuzz starts. A
#: bomb that slips past the pixel check then fails with MemoryError (a test failure) instead
#: of taking the machine's memory; the soft limit is put back afterwards.
HEADROOM = 1024 * 2**20


def _mapped_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


@pytest.fixture(scope="module", autouse=True)
def address_space_cap():
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _mapped_bytes() + HEADROOM
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@settings(
    max_examples=EXAMPLES,
    deadline=None,  # a slow example is not a failure; pytest-timeout catches a hang
    derandomize=not LONG_RUN,
    database=None if not LONG_RUN else settings.default.database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=mutated_sources(), options=options_strategy)
def test_render_of_a_mutated_source_is_an_image_or_a_400(data: bytes, options: RenderOptions):
    if budget.spent():
        return
    try:
        with warnings.catch_warnings():
            # As in production, where a Pillow warning ("Truncated File Read", "Tag data larger
            # than file") is a log line; pytest's warnings-as-errors would change the path.
            warnings.simplefilter("ignore")
            check_render(data, options)
    except BaseException:
        budget.failed = True
        raise


def regression_cases() -> list[Path]:
    return sorted(p for p in REGRESSIONS.iterdir() if p.is_file() and p.suffix == ".bin")


def options_for(case: Path) -> RenderOptions:
    # File names carry the options that failed: <what>--w<width>-<format>.bin
    _, _, spec = case.stem.rpartition("--")
    width, fmt = spec.split("-")
    return RenderOptions(width=int(width.lstrip("w")), quality=50, format=fmt, **OPTION_LIMITS)


@pytest.mark.parametrize("case", regression_cases(), ids=lambda p: p.stem)
def test_fuzz_regression_renders_or_is_a_400(case: Path):
    # Runs under the module's address-space cap: each of these once asked for gigabytes.
    check_render(case.read_bytes(), options_for(case))


@pytest.mark.parametrize("case", [p for p in regression_cases() if p.name.startswith("gif-")], ids=lambda p: p.stem)
def test_gif_whose_frames_overhang_the_screen_is_refused_by_its_real_canvas(case: Path):
    with pytest.raises(BadSource, match=r"source is [0-9]+x[0-9]+ = .* MP, over the 2 MP limit"):
        render(case.read_bytes(), options_for(case))


def test_every_seed_renders_or_is_refused_unmutated():
    for data in SEEDS.values():
        check_render(data, RenderOptions(width=64, quality=50, format="webp", **OPTION_LIMITS))
