"""The memory estimate reads untrusted headers before any render: like render(), it answers
corrupt bytes with a ProxyError (a 4xx), never another exception (a 500)."""

from __future__ import annotations

import random

import pytest

from app.errors import ProxyError
from app.render import RenderOptions, render
from app.render.estimate import estimate_peak
from tests.upstream import corpus_dir

SOURCES = ["progressive.jpg", "palette_trns.png", "animated.gif", "animated.webp", "still.avif", "plain.bmp",
           "plain.tiff", "truncated.jpg", "bad_crc.png"]


def mutations(data: bytes, seed: int, count: int = 40) -> list[bytes]:
    """Deterministic damage to the first bytes, where the header lives: truncations, flips."""
    rng = random.Random(seed)
    out = [data[:n] for n in (1, 8, 16, 32, 64, 128, 512)]
    for _ in range(count):
        damaged = bytearray(data[:4096])
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        out.append(bytes(damaged) + data[4096:])
    return out


@pytest.mark.parametrize("name", SOURCES)
def test_damaged_headers_give_a_proxy_error_or_an_estimate_never_a_crash(name):
    data = (corpus_dir() / "edge" / name).read_bytes()
    options = RenderOptions(width=64, quality=75, format="webp")
    for index, damaged in enumerate(mutations(data, seed=len(name))):
        try:
            assert estimate_peak(damaged, options) > 0
        except ProxyError:
            pass
        except Exception as exc:
            pytest.fail(f"{name} mutation {index}: {type(exc).__name__}: {exc}")


def test_the_estimate_refuses_what_render_refuses_with_the_same_status():
    data = (corpus_dir() / "edge" / "random.bin").read_bytes()
    options = RenderOptions(width=64, quality=75, format="webp")
    with pytest.raises(ProxyError) as from_render:
        render(data, options)
    with pytest.raises(ProxyError) as from_estimate:
        estimate_peak(data, options)
    assert from_estimate.value.status == from_render.value.status == 400
