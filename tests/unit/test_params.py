from __future__ import annotations

import pytest

from app.errors import BadParameter, LoopDetected, SourceNotAllowed
from app.guard import URLPolicy
from app.image.params import ImageRequest, negotiate_format, parse_request
from app.render import AutoQuality
from app.settings import Settings

SETTINGS = Settings()
POLICY = URLPolicy()


def parse(accept: str = "", settings: Settings = SETTINGS, policy: URLPolicy = POLICY, **args: str) -> ImageRequest:
    return parse_request({k: [v] for k, v in args.items()}, accept, settings, policy)


def test_defaults():
    request = parse(url="https://example.com/a.jpg")
    assert (request.width, request.quality, request.format, request.negotiated) == (0, 75, "webp", False)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("https://EXAMPLE.com/a.jpg", "https://example.com/a.jpg"),
        ("https://example.com:443/a.jpg", "https://example.com/a.jpg"),
        ("http://example.com:80/a.jpg", "http://example.com/a.jpg"),
        ("https://example.com./a.jpg", "https://example.com/a.jpg"),
        ("https://example.com/a.jpg#frag", "https://example.com/a.jpg"),
        ("HTTPS://example.com/a.jpg", "https://example.com/a.jpg"),
        ("http://2130706433/a.jpg", "http://127.0.0.1/a.jpg"),
        ("http://[::FFFF:7f00:1]/a.jpg", "http://[::ffff:7f00:1]/a.jpg"),
    ],
    ids=["host-case", "https-default-port", "http-default-port", "trailing-dot", "fragment", "scheme-case",
         "decimal-ipv4", "ipv6-case"],
)
def test_equivalent_spellings_share_one_cache_key(a, b):
    assert parse(url=a).cache_key() == parse(url=b).cache_key()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"w": "640"}, {"w": "320"}),
        ({"q": "75"}, {"q": "76"}),
        ({"format": "webp"}, {"format": "avif"}),
        ({"url": "https://example.com/b.jpg"}, {}),
        ({"url": "https://example.com/a.jpg?v=2"}, {}),
    ],
)
def test_what_changes_the_bytes_changes_the_key(a, b):
    base = {"url": "https://example.com/a.jpg"}
    assert parse(**{**base, **a}).cache_key() != parse(**{**base, **b}).cache_key()


def test_auto_answered_with_avif_shares_the_avif_entry():
    auto = parse("image/avif,image/webp,*/*", url="https://example.com/a.jpg", format="auto")
    avif = parse(url="https://example.com/a.jpg", format="avif")
    assert auto.format == "avif" and auto.negotiated
    assert auto.cache_key() == avif.cache_key()


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("image/avif,image/webp,*/*", "avif"),
        ("image/webp,*/*", "webp"),
        ("*/*", "webp"),
        ("", "webp"),
        ("image/*", "webp"),
        ("image/avif;q=0", "webp"),
        ("IMAGE/AVIF", "avif"),
        ("image/avif;q=0.5, image/webp", "avif"),
    ],
)
def test_format_negotiation(accept, expected):
    assert negotiate_format(accept) == expected


def test_allowed_widths_limit_w():
    settings = Settings(allowed_widths=(320, 640))
    assert parse(settings=settings, url="https://example.com/a.jpg", w="640").width == 640
    assert parse(settings=settings, url="https://example.com/a.jpg", w="0").width == 0
    with pytest.raises(BadParameter, match="w:"):
        parse(settings=settings, url="https://example.com/a.jpg", w="641")


def test_allowed_hosts_limit_sources():
    policy = URLPolicy(allowed_hosts=("example.com", "*.cdn.example.org"))
    assert parse(policy=policy, url="https://img.cdn.example.org/a.jpg")
    assert parse(policy=policy, url="https://example.com/a.jpg")
    for refused in ("https://cdn.example.org/a.jpg", "https://evil.com/a.jpg", "https://example.com.evil.com/a"):
        with pytest.raises(SourceNotAllowed):
            parse(policy=policy, url=refused)


def test_url_pointing_at_this_service_is_a_loop():
    policy = URLPolicy(self_origins=frozenset({"proxy.example:443", "127.0.0.1:8000"}))
    with pytest.raises(LoopDetected):
        parse(policy=policy, url="https://proxy.example/image?url=x")
    with pytest.raises(LoopDetected):
        parse(policy=policy, url="http://127.0.0.1:8000/image")


def test_q_auto_carries_the_target_setting():
    request = parse(settings=Settings(auto_quality_target=82.5), url="https://example.com/a.jpg", q="auto")
    assert request.quality == AutoQuality(82.5)


@pytest.mark.parametrize("text", ["Auto", "AUTO", "auto5", "5auto", " auto", "auto ", "automatic", "au"])
def test_q_takes_only_the_word_auto(text):
    with pytest.raises(BadParameter, match=r"^q:"):
        parse(url="https://example.com/a.jpg", q=text)


def test_q_auto_and_every_fixed_q_have_distinct_keys():
    auto = parse(url="https://example.com/a.jpg", q="auto").cache_key()
    fixed = {parse(url="https://example.com/a.jpg", q=str(q)).cache_key() for q in range(1, 101)}
    assert auto not in fixed
    assert auto.source == next(iter(fixed)).source  # one source: purge and the kept copy still cover it


def test_a_changed_target_is_another_key():
    keys = {
        parse(settings=Settings(auto_quality_target=t), url="https://example.com/a.jpg", q="auto").cache_key()
        for t in (70.0, 70.1, 80.0)
    }
    assert len(keys) == 3
