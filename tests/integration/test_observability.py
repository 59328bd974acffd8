"""Metrics in Prometheus text format and the structured access log."""

from __future__ import annotations

import json
import logging
from urllib.parse import quote

from prometheus_client.parser import text_string_to_metric_families

from app import create_app


def samples(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_cache_results_bytes_and_times(client, upstream):
    before = samples(client)
    path = f"/image?url={quote(upstream.url('photos/insect_2560x1280.jpg'), safe='')}&w=200"
    miss, hit = client.get(path), client.get(path)
    client.get(f"/image?url={quote(upstream.url('status/404'), safe='')}")
    after = samples(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("image_proxy_requests_total", endpoint="image.image", status="200", format="webp") == 2
    assert delta("image_proxy_requests_total", endpoint="image.image", status="404", format="webp") == 1
    assert delta("image_proxy_cache_requests_total", result="miss") == 2
    assert delta("image_proxy_cache_requests_total", result="hit") == 1
    assert delta("image_proxy_output_bytes_total") == len(miss.get_data()) + len(hit.get_data())
    assert delta("image_proxy_source_bytes_total") > 100_000
    assert delta("image_proxy_render_seconds_count", format="webp", width_bucket="le320") == 1
    assert delta("image_proxy_upstream_fetch_seconds_count") == 1  # the 404 delivered no body
    assert delta("image_proxy_errors_total", kind="not_found") == 1


def test_access_log_is_one_json_line_per_request_without_the_source_query(settings, upstream, caplog):
    app = create_app(settings.replace(log_format="json"))
    client = app.test_client()
    secret_url = upstream.url("photos/insect_2560x1280.jpg") + "?token=s3cret"
    with caplog.at_level(logging.INFO, logger="image_proxy.access"):
        client.get(f"/image?url={quote(secret_url, safe='')}&w=100")
    lines = [r.getMessage() for r in caplog.records if r.name == "image_proxy.access"]
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["method"] == "GET" and record["path"] == "/image" and record["status"] == 200
    assert record["cache"] == "MISS"
    assert record["bytes"] > 0
    assert record["upstream_ms"] > 0 and record["render_ms"] > 0 and record["total_ms"] >= record["render_ms"]
    assert "s3cret" not in lines[0]
