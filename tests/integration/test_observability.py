"""Metrics in Prometheus text format and the structured access log."""

from __future__ import annotations

import ipaddress
import json
import logging
import sys
from urllib.parse import quote

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.factory import create_app


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


def _access_lines(app, caplog, path: str, **kwargs) -> list[str]:
    """The formatted lines (as the service's handler writes them) of one request."""
    handler = logging.getLogger("image_proxy").handlers[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="image_proxy.access"):
        app.test_client().get(path, **kwargs)
    return [handler.format(r) for r in caplog.records if r.name == "image_proxy.access"]


def test_json_access_lines_are_only_json_with_a_time_and_no_text_prefix(settings, upstream, caplog):
    app = create_app(settings.replace(log_format="json"))
    [line] = _access_lines(app, caplog, f"/image?url={quote(upstream.url('photos/insect_2560x1280.jpg'), safe='')}")
    assert line.startswith("{") and line.endswith("}"), line
    record = json.loads(line)
    assert record["time"].endswith("Z") and record["status"] == 200 and record["client"] == "127.0.0.1"


def test_control_characters_in_the_path_never_start_a_second_line(settings, caplog):
    for log_format in ("text", "json"):
        app = create_app(settings.replace(log_format=log_format))
        [line] = _access_lines(app, caplog, "/%0aFORGED%0d%1b[31m%7f%c2%85%e2%80%a8 x")
        assert "\n" not in line and "\r" not in line, line
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in line), repr(line)
        if log_format == "json":
            assert json.loads(line)["path"] == "/\nFORGED\r\x1b[31m\x7f\x85\u2028 x", "JSON escapes, never loses"
        else:
            assert 'path="/\\nFORGED\\r\\x1b[31m\\x7f\\x85\\u2028 x"' in line, line


def test_error_lines_and_tracebacks_are_one_line_too(settings, caplog):
    handler = logging.getLogger("image_proxy").handlers[0]
    for log_format in ("text", "json"):
        create_app(settings.replace(log_format=log_format))
        try:
            raise ValueError("bad\nFORGED line")
        except ValueError:
            record = logging.getLogger("image_proxy").makeRecord(
                "image_proxy", logging.ERROR, __file__, 1, "failed: %s", ("a\nb",), sys.exc_info()
            )
        line = handler.format(record)
        assert "\n" not in line and "FORGED" in line
        if log_format == "json":
            parsed = json.loads(line)
            assert parsed["message"] == "failed: a\nb" and "ValueError: bad\nFORGED line" in parsed["exc"]


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "expected"),
    [
        ("127.0.0.1", "203.0.113.7", "203.0.113.7"),
        ("127.0.0.1", "6.6.6.6, 203.0.113.7", "203.0.113.7"),
        ("127.0.0.1", None, "127.0.0.1"),
        ("192.0.2.10", "203.0.113.7", "192.0.2.10"),
        ("127.0.0.1", "not-an-ip", "127.0.0.1"),
    ],
    ids=["trusted-proxy", "client-prepended-entry-ignored", "no-header", "untrusted-peer", "garbage-entry"],
)
def test_client_address_comes_from_x_forwarded_for_only_through_a_trusted_proxy(
    settings, caplog, peer, forwarded_for, expected
):
    app = create_app(settings.replace(log_format="json"))
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    [line] = _access_lines(app, caplog, "/healthz", headers=headers, environ_base={"REMOTE_ADDR": peer})
    assert json.loads(line)["client"] == expected


def test_trusted_proxies_setting_decides_whose_header_counts(settings, caplog):
    app = create_app(settings.replace(log_format="json", trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),)))
    environ = {"REMOTE_ADDR": "10.1.2.3"}
    [line] = _access_lines(app, caplog, "/healthz", headers={"X-Forwarded-For": "203.0.113.9"}, environ_base=environ)
    assert json.loads(line)["client"] == "203.0.113.9"
    environ = {"REMOTE_ADDR": "127.0.0.1"}  # loopback is no longer trusted
    [line] = _access_lines(app, caplog, "/healthz", headers={"X-Forwarded-For": "203.0.113.9"}, environ_base=environ)
    assert json.loads(line)["client"] == "127.0.0.1"


def test_metrics_answer_loopback_peers_only_unless_a_metrics_listener_is_set(settings):
    app = create_app(settings)
    assert app.test_client().get("/metrics").status_code == 200
    assert app.test_client().get("/metrics", environ_base={"REMOTE_ADDR": "192.0.2.1"}).status_code == 404
    with_listener = create_app(settings.replace(metrics_bind="127.0.0.1:9"))
    assert with_listener.test_client().get("/metrics").status_code == 404, "only on the metrics listener"


def test_every_response_names_the_version_that_answered(client):
    from app import __version__

    assert client.get("/healthz").headers["X-Image-Proxy-Version"] == __version__
    assert client.get("/image?w=abc").headers["X-Image-Proxy-Version"] == __version__
