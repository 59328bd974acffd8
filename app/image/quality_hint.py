"""Learn once per source: the q that q=auto chose for one variant starts the search of the next
(RenderOptions.quality_hint). Pure helpers for the serve layer, which reads and writes the keys.

The keys carry the source's hash tag, so they sit in the source's Redis Cluster slot beside its
variants, and /admin/purge's SCAN of `ip:{S}:*` finds them. One key per target and format: a
changed target learns anew, and a format that has no q yet starts from the other format's,
shifted (app/render/auto_quality.py, carried_hint).
"""

from __future__ import annotations

from collections.abc import Sequence

from app.render.auto_quality import carried_hint
from app.render.canvas import AutoQuality

FORMATS = ("webp", "avif")


def hint_key(source: str, quality: AutoQuality, fmt: str) -> str:
    return f"ip:{{{source}}}:aq:{quality.target:g}:{fmt}"


def hint_keys(source: str, quality: AutoQuality, fmt: str) -> list[str]:
    """This format's key first, then the other format's: one MGET reads both."""
    return [hint_key(source, quality, f) for f in (fmt, *(f for f in FORMATS if f != fmt))]


def read_hint(values: Sequence[bytes | str | None], fmt: str) -> int | None:
    """The hint from the MGET of hint_keys(): this format's q, else the other's shifted; None
    when neither is there or a value is not a q (a hint is only a start: never an error)."""
    others = [f for f in FORMATS if f != fmt]
    for found_for, raw in zip((fmt, *others), values, strict=False):
        if raw is None:
            continue
        text = raw.decode() if isinstance(raw, bytes) else raw
        if text.isdigit() and 1 <= int(text) <= 100:
            return int(text) if found_for == fmt else carried_hint(int(text), found_for, fmt)
    return None


def hint_value(quality: int) -> bytes:
    return str(quality).encode()
