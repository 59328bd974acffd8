"""Prometheus metrics, shared across gunicorn workers through prometheus_client's multiprocess
mode (PROMETHEUS_MULTIPROC_DIR, set by gunicorn.conf.py before any worker imports this)."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from app.metrics_cleanup import LockedMultiProcessCollector

_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30)

REQUESTS = Counter("image_proxy_requests_total", "HTTP requests answered, by endpoint, status and format",
                   ["endpoint", "status", "format"])
CACHE = Counter("image_proxy_cache_requests_total", "Image requests by cache result", ["result"])
DEDUP_WAITS = Counter("image_proxy_dedup_waits_total", "Requests that waited for another request's render")
DEDUP_WAIT_SECONDS = Histogram("image_proxy_dedup_wait_seconds", "Time waited for another request's render",
                               buckets=_TIME_BUCKETS)
UPSTREAM_SECONDS = Histogram("image_proxy_upstream_fetch_seconds", "Upstream fetch time, connect to last byte",
                             buckets=_TIME_BUCKETS)
RENDER_SECONDS = Histogram("image_proxy_render_seconds", "Decode + resize + encode time",
                           ["format", "width_bucket"], buckets=_TIME_BUCKETS)
SOURCE_BYTES = Counter("image_proxy_source_bytes_total", "Bytes fetched from upstreams")
OUTPUT_BYTES = Counter("image_proxy_output_bytes_total", "Image bytes sent to clients")
SOURCE_REUSE = Counter("image_proxy_source_reuse_total",
                       "Renders fed by a kept source instead of an upstream download")
REVALIDATIONS = Counter("image_proxy_revalidations_total",
                        "Upstream revalidations of a source past its freshness, by result "
                        "(not_modified, unchanged, changed, failed, not_found, ...)", ["result"])
STALE_SERVES = Counter("image_proxy_stale_serves_total",
                       "Stale entries served (X-Cache: STALE) because the upstream failed")
PURGED = Counter("image_proxy_purged_entries_total", "Cache entries removed by POST /admin/purge")
ERRORS = Counter("image_proxy_errors_total", "Failed image requests by kind (upstream, source, guard, busy)",
                 ["kind"])


def width_bucket(width: int) -> str:
    if width == 0:
        return "original"
    for edge in (320, 640, 1280, 1920, 3840):
        if width <= edge:
            return f"le{edge}"
    return "gt3840"


def exposition() -> tuple[bytes, str]:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        registry = CollectorRegistry()
        # Locked: the master folds dead workers' files into archives (app/metrics_cleanup.py).
        LockedMultiProcessCollector(registry, path=directory)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
