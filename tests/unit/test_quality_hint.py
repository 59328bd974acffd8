from __future__ import annotations

from app.guard import parse_source_url
from app.image.params import source_digest
from app.image.quality_hint import hint_key, hint_keys, hint_value, read_hint
from app.render import AutoQuality
from app.render.auto_quality import START


def test_keys_share_the_source_hash_tag_and_name_target_and_format():
    source = source_digest(parse_source_url("https://example.com/a.jpg"))
    keys = hint_keys(source, AutoQuality(70.0), "avif")
    assert keys == [f"ip:{{{source}}}:aq:70:avif", f"ip:{{{source}}}:aq:70:webp"]
    assert hint_key(source, AutoQuality(70.5), "webp") != hint_key(source, AutoQuality(70.0), "webp")


def test_read_prefers_the_same_format_and_shifts_the_other():
    assert read_hint([hint_value(71), hint_value(80)], "webp") == 71
    assert read_hint([None, hint_value(80)], "avif") == 80 + START["avif"] - START["webp"]
    assert read_hint([None, None], "webp") is None


def test_a_bad_value_is_no_hint():
    assert read_hint([b"abc", None], "webp") is None
    assert read_hint([b"0", b"101"], "webp") is None
    assert read_hint(["77", None], "webp") == 77
