"""What a q=auto render chose, as entry meta: written where the entry is made, read by the
response (X-Quality), so a cache hit says what the miss chose without another Redis call."""

from __future__ import annotations

from app.render import Rendered

AUTO_QUALITY = "auto_quality"
AUTO_QUALITY_SCORE = "auto_quality_score"


def quality_meta(rendered: Rendered) -> dict[str, object]:
    """Meta fields for the entry of `rendered`: empty for a fixed q (the q is in the URL)."""
    if rendered.quality_score is None:
        return {}
    return {AUTO_QUALITY: rendered.quality, AUTO_QUALITY_SCORE: rendered.quality_score}
