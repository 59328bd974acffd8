"""Two spellings of one source are one fetch, one cache entry and one purge: the normalized
URL (app/guard.py) is what is fetched, keyed and purged."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from app import create_app
from app.settings import Settings

TOKEN = "admin-t0ken-for-tests-0123"
SOURCE = "edge/plain.bmp"


@pytest.fixture
def admin_app(settings: Settings):
    app = create_app(settings.replace(admin_token=TOKEN))
    yield app
    app.extensions["image_proxy"].fetcher.close()


def spellings(upstream) -> list[str]:
    return [
        upstream.url(SOURCE),
        upstream.url("x/../" + SOURCE),
        upstream.url("x/y/../.././edge/./plain.bmp"),
        upstream.url("%65dge/%2E%2e/edge/plain%2ebmp"),
        upstream.base.upper().replace("HTTP://", "http://") + "/" + SOURCE,
    ]


def get(client, source: str):
    return client.get(f"/image?url={quote(source, safe='')}&w=64")


def test_every_spelling_of_one_source_is_one_fetch_and_then_hits(client, upstream):
    answers = [get(client, source) for source in spellings(upstream)]
    assert [a.status_code for a in answers] == [200] * len(answers)
    assert [a.headers["X-Cache"] for a in answers] == ["MISS"] + ["HIT"] * (len(answers) - 1)
    assert len({a.get_data() for a in answers}) == 1
    # The upstream was asked once, for the normalized path: what the key names was fetched.
    assert dict(upstream.hits) == {"/" + SOURCE: 1}


def test_the_dot_segment_spelling_first_still_fetches_the_normalized_path(client, upstream):
    assert get(client, upstream.url("x/../" + SOURCE)).headers["X-Cache"] == "MISS"
    assert get(client, upstream.url(SOURCE)).headers["X-Cache"] == "HIT"
    assert dict(upstream.hits) == {"/" + SOURCE: 1}


def test_purging_one_spelling_purges_the_entry_of_another(admin_app, upstream):
    client = admin_app.test_client()
    assert get(client, upstream.url(SOURCE)).headers["X-Cache"] == "MISS"
    purged = client.post("/admin/purge", headers={"Authorization": f"Bearer {TOKEN}"},
                         json={"url": upstream.url("x/../%65dge/plain.bmp")})
    assert purged.status_code == 200 and purged.json["purged"] >= 1
    assert get(client, upstream.url(SOURCE)).headers["X-Cache"] == "MISS"
    assert upstream.hits["/" + SOURCE] == 2
