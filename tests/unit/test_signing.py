"""Signed URLs without a server: the canonical string, signatures, the keys setting, the check
the server runs (check_signature, fed by werkzeug's own query parser), the helper command, the
test vectors and the openssl recipe in docs/api.md."""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from werkzeug.wrappers import Request

from app import signing
from app.errors import BadParameter, BadSignature
from app.image.params import check_signature
from app.settings import Settings, SettingsError, parse_signing_keys
from app.signing import Signer, canonical, signature, verify

ROOT = Path(__file__).resolve().parents[2]
API_DOC = ROOT / "docs" / "api.md"
KEY = "unit-test-signing-key-0123456789abcdef"
OTHER_KEY = "another-signing-key-for-rotation-0123456"
BASE = "http://127.0.0.1:8000"


# -- the canonical string -----------------------------------------------------------------

CANONICAL = [
    ({"url": "https://example.com/p.jpg?v=2", "w": "640"},
     "url=https%3A%2F%2Fexample.com%2Fp.jpg%3Fv%3D2&w=640"),
    ({"format": "avif", "q": "80", "w": "320", "url": "http://a/b"},
     "url=http%3A%2F%2Fa%2Fb&w=320&q=80&format=avif"),
    ({"url": "http://a/b", "w": None, "q": "60"}, "url=http%3A%2F%2Fa%2Fb&q=60"),
    ({"url": "http://a/b", "x": "1", "s": "zzz", "utm_source": "mail"}, "url=http%3A%2F%2Fa%2Fb"),
    ({"url": "http://a/café/日本.jpg"}, "url=http%3A%2F%2Fa%2Fcaf%C3%A9%2F%E6%97%A5%E6%9C%AC.jpg"),
    ({"url": "http://a/a+b c.jpg"}, "url=http%3A%2F%2Fa%2Fa%2Bb%20c.jpg"),
    ({"url": "http://a/x%2Fy.jpg"}, "url=http%3A%2F%2Fa%2Fx%252Fy.jpg"),
    ({"url": "http://a/?a=1;b=2&c=[x]!*'()@$,"},
     "url=http%3A%2F%2Fa%2F%3Fa%3D1%3Bb%3D2%26c%3D%5Bx%5D%21%2A%27%28%29%40%24%2C"),
    ({"url": "http://a/-._~"}, "url=http%3A%2F%2Fa%2F-._~"),
    ({"url": "http://a/b", "w": ""}, "url=http%3A%2F%2Fa%2Fb&w="),
    ({"url": "http://a/b", "w": 640, "q": 75}, "url=http%3A%2F%2Fa%2Fb&w=640&q=75"),
    ({}, ""),
]


@pytest.mark.parametrize(("params", "expected"), CANONICAL, ids=[
    "issue-example", "fixed-order", "absent-left-out", "unknown-and-s-not-signed", "unicode-as-utf8",
    "plus-and-space-encoded", "percent-2F-encoded-again", "reserved-characters", "unreserved-kept",
    "empty-value-kept", "numbers", "nothing"])
def test_canonical_string_joins_the_signed_parameters_in_order_with_unreserved_characters_only(params, expected):
    assert canonical(params) == expected


def test_signature_is_unpadded_base64url_of_hmac_sha256_over_the_canonical_string():
    params = {"url": "https://example.com/p.jpg?v=2", "w": "640"}
    digest = hmac.new(KEY.encode(), canonical(params).encode(), hashlib.sha256).digest()
    expected = base64.urlsafe_b64encode(digest).decode().rstrip("=")
    assert signature(KEY, params) == expected
    assert len(expected) == 43 and re.fullmatch(r"[A-Za-z0-9_-]+", expected)


def test_a_non_ascii_key_is_used_as_its_utf8_bytes():
    key = "clé-secrète-ünïcode-0123456789abcdefgh"
    digest = hmac.new(key.encode("utf-8"), b"url=x", hashlib.sha256).digest()
    assert signature(key, {"url": "x"}) == base64.urlsafe_b64encode(digest).decode().rstrip("=")


# -- verification -------------------------------------------------------------------------

PARAMS = {"url": "https://example.com/p.jpg", "w": "640", "q": "70", "format": "avif"}


def test_any_listed_key_verifies_and_none_else():
    keys = (KEY, OTHER_KEY)
    assert verify(signature(KEY, PARAMS), PARAMS, keys)
    assert verify(signature(OTHER_KEY, PARAMS), PARAMS, keys)
    assert not verify(signature("a-third-key-never-configured-0123456789", PARAMS), PARAMS, keys)


def _respellings(good: str) -> list[str]:
    digest = base64.urlsafe_b64decode(good + "=")
    standard = base64.b64encode(digest).decode().rstrip("=")
    return [good + "=", good[:-1], good[:20], "", good.upper() if good != good.upper() else good.lower(),
            standard if standard != good else good + "A", good + " ", "é" + good[1:], "\x00" * 43]


def test_only_the_exact_unpadded_spelling_verifies():
    good = signature(KEY, PARAMS)
    for spelling in _respellings(good):
        assert not verify(spelling, PARAMS, (KEY,)), spelling
    # The last character carries 2 spare bits: a different character with the same bytes is
    # still refused, because signatures are compared as text.
    assert verify(good, PARAMS, (KEY,))


@pytest.mark.parametrize("name", signing.SIGNED_PARAMS)
def test_changing_any_signed_parameter_breaks_the_signature(name):
    good = signature(KEY, PARAMS)
    for changed in ({**PARAMS, name: PARAMS[name] + "0"}, {k: v for k, v in PARAMS.items() if k != name}):
        assert not verify(good, changed, (KEY,))


# -- the keys setting ----------------------------------------------------------------------

def test_keys_are_comma_separated_trimmed_and_empty_means_off():
    assert parse_signing_keys("") == ()
    assert parse_signing_keys(f" {KEY} , {OTHER_KEY} ") == (KEY, OTHER_KEY)


def test_a_short_key_stops_start_up_naming_the_variable_but_never_the_key():
    secret = "short-secret-31-characters-long"
    assert len(secret) == 31
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"IMAGE_PROXY_SIGNING_KEYS": f"{KEY},{secret}"})
    assert "IMAGE_PROXY_SIGNING_KEYS" in str(caught.value) and "key 2 of 2" in str(caught.value)
    assert secret not in str(caught.value) and KEY not in str(caught.value)


def test_keys_are_not_printed_with_the_settings():
    settings = Settings.from_env({"IMAGE_PROXY_SIGNING_KEYS": KEY})
    assert settings.signing_keys == (KEY,)
    assert KEY not in repr(settings)


# -- the server's check, on the query as werkzeug parses it ---------------------------------

def _args(url: str) -> dict[str, list[str]]:
    query = urlsplit(url).query
    return Request.from_values(query_string=query).args.to_dict(flat=False)


def test_helper_urls_pass_the_servers_check_with_either_rotation_key():
    signer = Signer((KEY, OTHER_KEY), BASE)
    for params in ({"w": 640}, {"w": 320, "q": 60, "format": "avif"}, {}, {"format": "auto"}):
        for source in ("https://example.com/p.jpg?v=2&x=a+b", "https://example.com/caf%C3%A9/é ü/[1].jpg"):
            url = signer.url(source, **params)
            check_signature(_args(url), (OTHER_KEY, KEY))  # order of the server's list does not matter
            with pytest.raises(BadSignature):
                check_signature(_args(url), (OTHER_KEY,))  # the helper signs with the first key


def test_the_helpers_query_string_is_the_canonical_string_then_s():
    url = Signer((KEY,), BASE + "/").url("https://example.com/p.jpg?v=2", w=640)
    assert url == (f"{BASE}/image?url=https%3A%2F%2Fexample.com%2Fp.jpg%3Fv%3D2&w=640"
                   f"&s={signature(KEY, {'url': 'https://example.com/p.jpg?v=2', 'w': '640'})}")


def test_another_spelling_of_the_same_values_carries_the_same_signature():
    s = signature(KEY, {"url": "https://example.com/p.jpg", "w": "640"})
    check_signature(_args(f"/image?w=640&url=https://example.com/p.jpg&s={s}&utm=1"), (KEY,))
    check_signature(_args(f"/image?url=https%3a%2f%2fexample.com%2fp.jpg&w=640&s={s}"), (KEY,))


@pytest.mark.parametrize(("query", "error"), [
    ("url=http%3A%2F%2Fa%2Fb&w=640", BadSignature),
    ("url=http%3A%2F%2Fa%2Fb&w=640&s=", BadSignature),
    ("url=http%3A%2F%2Fa%2Fb&w=640&s={s}&s={s}", BadParameter),
    ("url=http%3A%2F%2Fa%2Fb&w=640&w=640&s={s}", BadParameter),
    ("url=http%3A%2F%2Fa%2Fb&w=641&s={s}", BadSignature),
    ("url=http%3A%2F%2Fa%2Fb&w=640&q=75&s={s}", BadSignature),
    ("url=http%3A%2F%2Fa%2Fb&s={s}", BadSignature),
    ("url=http%3A%2F%2Fa%2Fb&w=640&s={s}%3D", BadSignature),
    ("url=http%3A%2F%2Fa%2Fb&w=640&s=%FF%FE", BadSignature),
], ids=["missing", "empty", "twice", "signed-param-twice", "w-changed", "q-added", "w-removed", "padded",
        "not-utf8"])
def test_the_servers_check_refuses_with_403_or_400(query, error):
    s = signature(KEY, {"url": "http://a/b", "w": "640"})
    with pytest.raises(error) as caught:
        check_signature(_args("/image?" + query.format(s=s)), (KEY,))
    assert caught.value.status == (400 if error is BadParameter else 403)


# -- docs/api.md: the test vectors and the openssl recipe ---------------------------------

def _vectors() -> list[dict[str, str]]:
    text = API_DOC.read_text()
    block = re.search(r"<!-- signing-vectors:begin -->\n(.*?)\n<!-- signing-vectors:end -->", text, re.S)
    assert block, "docs/api.md must hold the signing test vectors"
    key = re.search(r"Key `([^`]+)`; a `—` parameter is absent", text)
    assert key, "docs/api.md must name the vectors' key"
    rows = []
    for line in block.group(1).splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        url, w, q, fmt, text_c, s = (None if cell == "—" else cell.strip("`") for cell in cells)
        rows.append({"key": key.group(1), "url": url, "w": w, "q": q, "format": fmt, "C": text_c, "s": s})
    return rows


def test_docs_api_signing_vectors_hold():
    vectors = _vectors()
    assert len(vectors) >= 5
    for row in vectors:
        params = {name: row[name] for name in signing.SIGNED_PARAMS}
        assert canonical(params) == row["C"], row
        # Recomputed here from the documented C, without app.signing's code:
        digest = hmac.new(row["key"].encode(), row["C"].encode(), hashlib.sha256).digest()
        assert base64.urlsafe_b64encode(digest).decode().rstrip("=") == row["s"], row
        assert signature(row["key"], params) == row["s"]


def _recipe() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", API_DOC.read_text(), re.S)
    recipe = [block for block in blocks if "signed_url()" in block]
    assert len(recipe) == 1, "docs/api.md must hold one openssl recipe defining signed_url()"
    return recipe[0]


@pytest.mark.skipif(not (shutil.which("bash") and shutil.which("openssl")), reason="needs bash and openssl")
def test_docs_openssl_recipe_signs_like_the_helper():
    sources = ["https://example.com/p.jpg?v=2", "https://example.com/café/a b+c.jpg?x=[1]&y=~'()*!"]
    script = _recipe().rsplit("signed_url https://", 1)[0]  # the functions, not the example call
    script += "".join(f'signed_url {BASE} "$SOURCE{i}" 640 webp\n' for i in range(len(sources)))
    env = {"PATH": os.environ["PATH"], "IMAGE_PROXY_SIGNING_KEYS": f"{KEY},{OTHER_KEY}",
           **{f"SOURCE{i}": source for i, source in enumerate(sources)}}
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=True)
    signer = Signer((KEY,), BASE)
    assert result.stdout.splitlines() == [signer.url(source, w=640, format="webp") for source in sources]


# -- the command ---------------------------------------------------------------------------

def _command(*args: str, keys: str = f"{KEY},{OTHER_KEY}") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGE_PROXY_")}
    env["IMAGE_PROXY_SIGNING_KEYS"] = keys
    return subprocess.run([sys.executable, "-m", "app.signing", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_command_prints_one_signed_url_with_the_first_key():
    result = _command("--base", BASE, "https://example.com/p.jpg", "-w", "640", "-q", "70", "-f", "avif")
    assert result.returncode == 0, result.stderr
    assert result.stdout == Signer((KEY,), BASE).url("https://example.com/p.jpg", w=640, q=70, format="avif") + "\n"


def test_command_prints_a_srcset_and_one_source_element_per_format():
    one = _command("--base", BASE, "https://example.com/p.jpg", "--widths", "320,640")
    assert one.returncode == 0, one.stderr
    assert one.stdout == Signer((KEY,), BASE).srcset("https://example.com/p.jpg", [320, 640]) + "\n"
    several = _command("--base", BASE, "https://example.com/p.jpg", "--widths", "320,640", "-f", "avif,webp")
    lines = several.stdout.splitlines()
    assert [re.match(r'<source type="(image/\w+)" srcset="', line).group(1) for line in lines] == [
        "image/avif", "image/webp"]
    urls = re.findall(r"(http://\S+) (\d+)w", several.stdout.replace("&amp;", "&"))
    assert [int(width) for _, width in urls] == [320, 640, 320, 640]
    for url, width in urls:
        args = _args(url)
        check_signature(args, (KEY,))
        assert args["w"] == [width]


@pytest.mark.parametrize(("args", "keys", "message"), [
    (["--base", BASE, "http://a/b"], "", "IMAGE_PROXY_SIGNING_KEYS"),
    (["--base", BASE, "http://a/b"], "too-short", "at least 32"),
    (["--base", BASE, "http://a/b", "-f", "avif,webp"], KEY, "--widths"),
    (["--base", BASE, "http://a/b", "--widths", "0,640"], KEY, "above 0"),
    (["--base", BASE, "http://a/b", "--widths", "320", "-f", "auto,webp"], KEY, "one of webp, avif"),
    (["http://a/b"], KEY, "--base"),
], ids=["no-key", "short-key", "formats-without-widths", "zero-width", "auto-among-formats", "no-base"])
def test_command_refuses_what_it_cannot_sign_with_a_message(args, keys, message):
    result = _command(*args, keys=keys)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr
    assert "too-short" not in result.stderr


def test_signing_module_imports_without_flask_werkzeug_or_requests():
    code = "import sys, app.signing; print(__import__('json').dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=True)
    modules = json.loads(result.stdout)
    assert not [m for m in modules if m.split(".")[0] in ("flask", "werkzeug", "requests", "PIL", "redis")]


def test_docs_jinja_example_renders_signed_urls():
    from jinja2 import Environment

    template = re.findall(r"```jinja\n(.*?)```", API_DOC.read_text(), re.S)
    assert len(template) == 1, "docs/api.md must hold one Jinja example"
    signer = Signer((KEY,), BASE)
    env = Environment(autoescape=True)
    env.globals.update(image_url=signer.url, image_srcset=signer.srcset)  # as the doc says
    photo = {"url": "https://example.com/p.jpg?v=2&size=large", "title": "A <b> photo"}
    rendered = env.from_string(template[0]).render(photo=photo)
    src = re.search(r'src="([^"]+)"', rendered).group(1)
    srcset = re.search(r'srcset="([^"]+)"', rendered).group(1)
    assert "&amp;" in src and "<b>" not in rendered
    urls = [html.unescape(src)] + [html.unescape(c.rsplit(" ", 1)[0]) for c in srcset.split(", ")]
    assert len(urls) == 4
    for url in urls:
        check_signature(_args(url), (KEY,))
