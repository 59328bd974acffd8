"""IMAGE_PROXY_METRICS_BIND: a second gunicorn listener that alone serves /metrics."""

from __future__ import annotations

import pytest
import requests

from tests.conftest import free_port

pytestmark = pytest.mark.e2e


def test_metrics_are_served_on_the_metrics_listener_only(start_gunicorn):
    metrics_port = free_port()
    server = start_gunicorn(metrics_bind=f"127.0.0.1:{metrics_port}")
    private = f"http://127.0.0.1:{metrics_port}"
    assert requests.get(server.base + "/metrics", timeout=10).status_code == 404, "not on BIND"
    scrape = requests.get(private + "/metrics", timeout=10)
    assert scrape.status_code == 200 and "image_proxy_requests_total" in scrape.text
    assert requests.get(private + "/healthz", timeout=10).status_code == 200
    assert requests.get(private + "/image?w=abc", timeout=10).status_code == 404, "only health and metrics there"
    assert requests.get(server.base + "/image?w=abc", timeout=10).status_code == 400
