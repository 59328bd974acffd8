"""The /image parameter grammar, and ImageRequest: the value that is the cache key."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from app import signing
from app.cache import CacheKey
from app.errors import BadParameter, BadSignature
from app.guard import SourceURL, URLPolicy, parse_source_url
from app.render.canvas import AutoQuality
from app.settings import Settings

#: Bumped whenever a change to rendering changes output bytes, so old cache entries retire.
PIPELINE_VERSION = "4"  # 4: AVIF q=100 without SVT tune 3 (it shifted colours)

OutputFormat = Literal["webp", "avif"]
CONTENT_TYPES: dict[str, str] = {"webp": "image/webp", "avif": "image/avif"}
DEFAULT_QUALITY = 75
_DIGITS = re.compile(r"[0-9]{1,20}")


@dataclass(frozen=True)
class ImageRequest:
    """One normalized /image request. Holds only what changes the output bytes."""

    url: SourceURL
    width: int  # 0 = source width
    quality: int | AutoQuality  # q=auto carries the target, so the key changes with it
    format: OutputFormat
    #: The client asked for format=auto; the response then varies on Accept.
    negotiated: bool = False
    #: Worked out once, when the request is made: the fresh-hit layer keeps parsed requests,
    #: so a hit hashes nothing.
    _key: CacheKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The source's digest (shared by every variant of one URL, so its keys sit in one
        # Redis Cluster slot) and the variant's. `negotiated` is left out on purpose:
        # format=auto answered with AVIF and format=avif are the same bytes, one entry.
        variant = f"{PIPELINE_VERSION}\n{self.width}\n{self.quality}\n{self.format}"
        key = CacheKey(source_digest(self.url), hashlib.sha256(variant.encode()).hexdigest())
        object.__setattr__(self, "_key", key)  # frozen: set once, here

    def cache_key(self) -> CacheKey:
        return self._key

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


def source_digest(url: SourceURL) -> str:
    """The hash tag of every key of one normalized source URL (variants, kept source,
    freshness record): what /admin/purge deletes by."""
    return hashlib.sha256(str(url).encode()).hexdigest()


def parse_request(
    args: Mapping[str, Sequence[str]], accept: str, settings: Settings, url_policy: URLPolicy
) -> ImageRequest:
    """Read /image's query parameters into an ImageRequest, or raise BadParameter naming one.

    args maps each name to every value it was given (a query string can repeat names):

      url     absolute http(s) URL, at most 2048 characters        required
      w       plain digits 0..MAX_WIDTH, 0 = source width            default 0
      q       plain digits 1..100, or auto (lowest q reaching           default 75
              AUTO_QUALITY_TARGET, docs/image-fidelity.md)
      format  webp | avif | auto (AVIF if Accept names image/avif)   default webp

    Examples: url=https://example.com/a.jpg&w=640 -> 640 px WebP at q 75;
    w=+5, w=5.0, w=1e3, w= and a repeated w are all 400. Unknown names are ignored.
    """
    url_text = _single(args, "url")
    if url_text is None:
        raise BadParameter("url: missing (give an absolute http or https URL)")
    url = parse_source_url(url_text)
    url_policy.check(url)

    width = _number(args, "w", default=0, lo=0, hi=settings.max_width)
    if width and settings.allowed_widths and width not in settings.allowed_widths:
        allowed = ", ".join(str(w) for w in settings.allowed_widths)
        raise BadParameter(f"w: {width} is not an allowed width (0 or one of {allowed})")
    quality: int | AutoQuality
    if _single(args, "q") == "auto":  # lower case only, like format=auto
        quality = AutoQuality(settings.auto_quality_target)
    else:
        quality = _number(args, "q", default=DEFAULT_QUALITY, lo=1, hi=100)

    format_text = _single(args, "format")
    requested = "webp" if format_text is None else format_text
    if requested == "auto":
        return ImageRequest(url, width, quality, negotiate_format(accept), negotiated=True)
    if requested not in CONTENT_TYPES:
        raise BadParameter(f"format: {requested!r} is not one of webp, avif, auto")
    return ImageRequest(url, width, quality, requested)  # type: ignore[arg-type]


def check_signature(args: Mapping[str, Sequence[str]], keys: Sequence[str]) -> None:
    """With signing on (keys given), raise unless `s` signs url, w, q and format under one of
    keys (app/signing.py has the rule): s missing or wrong is BadSignature (403), s or a
    signed parameter given twice a BadParameter (400). Runs before anything else reads the
    request, so an unsigned URL reaches neither the cache nor the upstream."""
    given = args.get(signing.SIGNATURE_PARAM) or []
    if len(given) > 1:
        raise BadParameter(f"{signing.SIGNATURE_PARAM}: given {len(given)} times; give it once")
    signed: dict[str, str | None] = {}
    for name in signing.SIGNED_PARAMS:
        values = args.get(name) or [None]
        if len(values) > 1:
            raise BadParameter(f"{name}: given {len(values)} times; give it once")
        signed[name] = values[0]
    if not given:
        raise BadSignature("s: missing; this service answers signed URLs only")
    if not signing.verify(given[0], signed, keys):
        raise BadSignature("s: the signature does not match these parameters")


def negotiate_format(accept: str) -> OutputFormat:
    """AVIF only when Accept names image/avif with a non-zero q; a bare */* gets WebP."""
    for item in accept.lower().split(","):
        media, *params = (part.strip() for part in item.split(";"))
        if media != "image/avif":
            continue
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    if float(value) <= 0:
                        break
                except ValueError:
                    break
        else:
            return "avif"
    return "webp"


def _single(args: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = args.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadParameter(f"{name}: given {len(values)} times; give it once")
    if values[0] == "":
        raise BadParameter(f"{name}: empty value")
    return values[0]


def _number(args: Mapping[str, Sequence[str]], name: str, *, default: int, lo: int, hi: int) -> int:
    text = _single(args, name)
    if text is None:
        return default
    if not _DIGITS.fullmatch(text):
        also = " or auto" if name == "q" else ""
        raise BadParameter(f"{name}: {text[:40]!r} is not a whole number between {lo} and {hi}{also}")
    value = int(text)
    if not lo <= value <= hi:
        raise BadParameter(f"{name}: {value} is out of range ({lo}..{hi})")
    return value
