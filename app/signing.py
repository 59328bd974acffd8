"""Signed /image URLs: the canonical string, signing, verifying, and building URLs and srcsets.

The server verifies with this module (app/image/params.py, `check_signature`) and the helper
command builds URLs with it, so the two cannot disagree. Standard library only, so a template,
a build script or another service imports it without Flask.

The rule (SPEC section 11, docs/api.md "Signed URLs"):

    C = the parameters url, w, q, format, in that order, each one present as
        name=quote(value, safe="")  (value percent-decoded first; absent ones left out)
        joined by "&"
    s = base64url(HMAC-SHA256(key, C)) without "=" padding

    url=https://example.com/p.jpg?v=2, w=640
      -> C = "url=https%3A%2F%2Fexample.com%2Fp.jpg%3Fv%3D2&w=640"

Only this exact spelling of s verifies (43 characters, no padding): a signature is compared as
text, in constant time, against the one each key gives.

    image-proxy-url --base https://img.example.com https://example.com/p.jpg -w 640
    image-proxy-url --base https://img.example.com https://example.com/p.jpg --widths 320,640 -f avif,webp

read the signing key from IMAGE_PROXY_SIGNING_KEYS (the first key signs), like the server.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import html
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from app.settings import parse_signing_keys

ENV = "IMAGE_PROXY_SIGNING_KEYS"
#: The signed parameters, in the order the canonical string joins them.
SIGNED_PARAMS = ("url", "w", "q", "format")
SIGNATURE_PARAM = "s"
FORMAT_TYPES = {"webp": "image/webp", "avif": "image/avif"}

Params = Mapping[str, "str | int | None"]


def canonical(params: Params) -> str:
    """The signed string: url, w, q, format in that order, each present one as name=value with
    the value encoded with only RFC 3986's unreserved characters left as they are."""
    parts = []
    for name in SIGNED_PARAMS:
        value = params.get(name)
        if value is not None:
            parts.append(f"{name}={quote(str(value), safe='')}")
    return "&".join(parts)


def signature(key: str, params: Params) -> str:
    digest = hmac.new(key.encode("utf-8"), canonical(params).encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def verify(given: str, params: Params, keys: Iterable[str]) -> bool:
    """True when `given` is the signature of params under any of keys (constant-time compare)."""
    given_bytes = given.encode("utf-8", "replace")
    return any(hmac.compare_digest(given_bytes, signature(key, params).encode("ascii")) for key in keys)


@dataclass(frozen=True)
class Signer:
    """Builds signed /image URLs on one service: `base` is its root as clients reach it
    (https://img.example.com, or https://example.com/proxy behind a path prefix)."""

    keys: tuple[str, ...] = field(repr=False)
    base: str

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("no key given (the service's keys, comma-separated; the first one signs)")

    @classmethod
    def from_env(cls, base: str, environ: Mapping[str, str] | None = None) -> Signer:
        """The keys the server reads, from IMAGE_PROXY_SIGNING_KEYS; the first one signs."""
        environ = os.environ if environ is None else environ
        return cls(parse_signing_keys(environ.get(ENV, "")), base)

    def url(self, source: str, *, w: int | str | None = None, q: int | str | None = None,
            format: str | None = None) -> str:
        """The signed URL; its query string is the canonical string plus &s=."""
        params = {"url": source, "w": w, "q": q, "format": format}
        query = canonical(params)
        return f"{self.base.rstrip('/')}/image?{query}&{SIGNATURE_PARAM}={signature(self.keys[0], params)}"

    def srcset(self, source: str, widths: Sequence[int], *, q: int | str | None = None,
               format: str | None = None) -> str:
        """`url 320w, url 640w, ...`: one signed URL per width, for an <img> or <source>."""
        return ", ".join(f"{self.url(source, w=width, q=q, format=format)} {width}w" for width in widths)


# -- the command -------------------------------------------------------------------------


def _csv(convert: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [convert(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="image-proxy-url",
        description=f"Print a signed /image URL, or a srcset, signed with the first key of {ENV}.",
        epilog="With --widths and one format: one srcset line. With several formats: one "
        '<source type="..." srcset="..."> line per format, for a <picture>.',
    )
    parser.add_argument("source", help="the source image URL (absolute http or https)")
    parser.add_argument("--base", required=True, help="the service's root as clients reach it, e.g. https://img.example.com")
    parser.add_argument("-w", "--width", help="w (one URL)")
    parser.add_argument("--widths", type=_csv(int), help="comma-separated widths: print a srcset instead of one URL")
    parser.add_argument("-q", "--quality", help="q")
    parser.add_argument("-f", "--format", type=_csv(str), default=[],
                        help="format: webp, avif or auto; with --widths, a comma-separated list")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        signer = Signer.from_env(args.base)
    except ValueError as exc:
        parser.exit(2, f"image-proxy-url: {ENV}: {exc}\n")
    formats: list[str] = args.format
    if args.widths is None:
        if len(formats) > 1:
            parser.error("one URL has one format; give --widths for a srcset per format")
        print(signer.url(args.source, w=args.width, q=args.quality, format=formats[0] if formats else None))
        return 0
    if args.width is not None:
        parser.error("give -w for one URL or --widths for a srcset, not both")
    if not args.widths or any(width <= 0 for width in args.widths):
        parser.error("--widths: give whole numbers above 0 (a srcset names real widths)")
    if len(formats) <= 1:
        print(signer.srcset(args.source, args.widths, q=args.quality, format=formats[0] if formats else None))
        return 0
    unknown = [name for name in formats if name not in FORMAT_TYPES]
    if unknown:
        parser.error(f"with several formats each must be one of {', '.join(FORMAT_TYPES)} (got {', '.join(unknown)})")
    for name in formats:
        srcset = signer.srcset(args.source, args.widths, q=args.quality, format=name)
        print(f'<source type="{FORMAT_TYPES[name]}" srcset="{html.escape(srcset)}">')
    return 0


if __name__ == "__main__":
    sys.exit(main())
