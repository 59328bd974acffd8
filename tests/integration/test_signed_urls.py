"""Signed URLs through the app (the fresh-hit layer and Flask), a real redis-server and the
loopback upstream, which counts what it is asked: a refused request must reach neither."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from app import create_app
from app.settings import Settings
from app.signing import Signer, canonical, signature

NEW_KEY = "new-signing-key-for-tests-0123456789abcdef"
OLD_KEY = "old-signing-key-for-tests-0123456789abcdef"
STRANGER_KEY = "a-key-this-service-does-not-know-0123456789"
TOKEN = "admin-t0ken-for-tests-0123"
SOURCE = "edge/plain.bmp"


@pytest.fixture
def signed_app(settings: Settings):
    app = create_app(settings.replace(signing_keys=(NEW_KEY, OLD_KEY), admin_token=TOKEN))
    yield app
    app.extensions["image_proxy"].fetcher.close()


@pytest.fixture
def client(signed_app):
    return signed_app.test_client()


def signed(upstream, key: str = NEW_KEY, path: str = SOURCE, **params: object) -> str:
    return Signer((key,), "").url(upstream.url(path), **params)


def assert_refused(response, status: int = 403, *, head: bool = False) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json and (head or set(response.json) == {"error"})
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "X-Cache" not in response.headers


def test_a_validly_signed_url_is_served_then_hit(client, upstream):
    url = signed(upstream, w=64, q=70, format="webp")
    first, second = client.get(url), client.get(url)
    assert (first.status_code, first.headers["X-Cache"]) == (200, "MISS")
    assert (second.status_code, second.headers["X-Cache"]) == (200, "HIT")
    assert first.headers["Content-Type"] == "image/webp" and first.get_data() == second.get_data()
    assert upstream.hits["/" + SOURCE] == 1


def _tampered(upstream) -> dict[str, str]:
    """Every way a request can fail the check, each built from a valid w=64 q=70 webp URL."""
    good = signed(upstream, w=64, q=70, format="webp")
    base, s = good.rsplit("&s=", 1)
    source = quote(upstream.url(SOURCE), safe="")
    other = quote(upstream.url("v/x/" + SOURCE), safe="")
    digest_padded = s + "="
    return {
        "url-changed": good.replace(source, other),
        "w-changed": good.replace("w=64", "w=65"),
        "q-changed": good.replace("q=70", "q=71"),
        "format-changed": good.replace("format=webp", "format=avif"),
        "w-removed": good.replace("&w=64", ""),
        "q-added-to-a-url-without-q": signed(upstream, w=64).replace("&s=", "&q=75&s="),
        "missing": base,
        "empty": base + "&s=",
        "another-key": signed(upstream, key=STRANGER_KEY, w=64, q=70, format="webp"),
        "truncated": base + "&s=" + s[:-1],
        "truncated-half": base + "&s=" + s[:22],
        "padded": base + "&s=" + quote(digest_padded, safe=""),
        "padded-unencoded": base + "&s=" + digest_padded,
        "standard-alphabet": base + "&s=" + quote(s.replace("-", "+").replace("_", "/"), safe="")
        if ("-" in s or "_" in s) else base + "&s=" + s + "A",
        "signature-of-other-params": base + "&s=" + signature(NEW_KEY, {"url": upstream.url(SOURCE)}),
    }


CASES = ["url-changed", "w-changed", "q-changed", "format-changed", "w-removed", "q-added-to-a-url-without-q",
         "missing", "empty", "another-key", "truncated", "truncated-half", "padded", "padded-unencoded",
         "standard-alphabet", "signature-of-other-params"]


@pytest.mark.parametrize("case", CASES)
def test_a_missing_or_wrong_signature_is_a_403_and_nothing_is_fetched(client, upstream, case):
    response = client.get(_tampered(upstream)[case])
    assert_refused(response, 403)
    assert response.json["error"].startswith("s: ")
    assert sum(upstream.hits.values()) == 0, "nothing fetched"


@pytest.mark.parametrize("query", ["&s={s}&s={s}", "&s={s}&s=", "&w=64&s={s}"], ids=["s-twice", "s-and-empty-s",
                                                                                   "w-twice"])
def test_a_repeated_s_or_signed_parameter_is_a_400_and_nothing_is_fetched(client, upstream, query):
    good = signed(upstream, w=64)
    s = good.rsplit("&s=", 1)[1]
    response = client.get(good.rsplit("&s=", 1)[0] + query.format(s=s))
    assert_refused(response, 400)
    assert sum(upstream.hits.values()) == 0


def test_a_cached_image_is_not_served_to_an_unsigned_or_wrongly_signed_request(client, upstream):
    good = signed(upstream, w=64)
    assert client.get(good).headers["X-Cache"] == "MISS"
    assert client.get(good).headers["X-Cache"] == "HIT", "the entry is cached (and the fresh-hit path answers)"
    base, s = good.rsplit("&s=", 1)
    for refused in (base, base + "&s=" + s[:-1], base + "&s=" + signature(STRANGER_KEY, {"url": upstream.url(SOURCE),
                                                                                          "w": "64"})):
        assert_refused(client.get(refused), 403)
        assert_refused(client.head(refused), 403, head=True)
    assert upstream.hits["/" + SOURCE] == 1


def test_bad_parameters_behind_a_missing_signature_are_a_403_not_a_400(client, upstream):
    # The signature is checked first: an unsigned client learns nothing about the parameters.
    assert_refused(client.get(f"/image?url={quote(upstream.url(SOURCE), safe='')}&w=abc"), 403)
    assert_refused(client.get("/image?url=ftp%3A%2F%2Fa%2Fb"), 403)
    assert_refused(client.get("/image"), 403)


def test_bad_parameters_with_a_valid_signature_are_the_usual_400(client, upstream):
    response = client.get(signed(upstream, w="abc"))
    assert_refused(response, 400)
    assert response.json["error"].startswith("w:")


def test_rotation_both_keys_verify_and_share_one_cache_entry(client, upstream):
    with_new, with_old = signed(upstream, key=NEW_KEY, w=64), signed(upstream, key=OLD_KEY, w=64)
    assert with_new != with_old
    first, second = client.get(with_old), client.get(with_new)
    assert (first.status_code, first.headers["X-Cache"]) == (200, "MISS")
    assert (second.status_code, second.headers["X-Cache"]) == (200, "HIT"), "s is not part of the cache key"
    assert upstream.hits["/" + SOURCE] == 1


def test_the_helper_signs_with_the_first_key(signed_app, upstream):
    settings = signed_app.extensions["image_proxy"].settings
    url = Signer(settings.signing_keys, "").url(upstream.url(SOURCE), w=64)
    assert url.endswith("&s=" + signature(NEW_KEY, {"url": upstream.url(SOURCE), "w": 64}))
    assert signed_app.test_client().get(url).status_code == 200


def test_unknown_parameters_are_not_signed(client, upstream):
    good = signed(upstream, w=64)
    assert client.get(good + "&utm_source=mail&x=1").status_code == 200


def test_any_spelling_of_the_signed_values_verifies(client, upstream):
    params = {"url": upstream.url(SOURCE), "w": "64"}
    s = signature(NEW_KEY, params)
    assert canonical(params).startswith("url=http%3A%2F%2F127.0.0.1")
    unencoded = f"/image?w=64&url={upstream.url(SOURCE)}&s={s}"
    lower_hex = f"/image?url={quote(upstream.url(SOURCE), safe='').lower()}&w=64&s={s}"
    assert "%3a%2f%2f" in lower_hex
    assert client.get(unencoded).status_code == 200
    assert client.get(lower_hex).status_code == 200


def test_the_front_page_is_off_while_signing_is_on(client, app):
    for path in ("/", "/front/config.json", "/front/static/front.js"):
        assert client.get(path).status_code == 404
    assert app.test_client().get("/").status_code == 200, "on without signing"


def test_admin_and_health_endpoints_are_unaffected(client, upstream):
    assert client.get("/healthz").status_code == 200
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get(signed(upstream, w=64)).status_code == 200
    purged = client.post("/admin/purge", headers=auth, json={"url": upstream.url(SOURCE)})
    assert purged.status_code == 200 and purged.json["purged"] >= 1
    warmed = client.post("/admin/warm", headers=auth, json={"url": upstream.url(SOURCE), "widths": [32]})
    assert warmed.status_code == 200 and warmed.json["variants"][0]["status"] == 200


def test_without_keys_s_is_an_ignored_unknown_parameter(app, upstream):
    url = f"/image?url={quote(upstream.url(SOURCE), safe='')}&w=64"
    client = app.test_client()
    assert client.get(url).status_code == 200
    assert client.get(url + "&s=anything&s=twice").headers["X-Cache"] == "HIT"
