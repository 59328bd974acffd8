"""create_app(settings=None): the Flask app with its clients, blueprint and error handling.

Clients (Redis, the upstream session) are made here, which gunicorn runs in each worker
after the fork (no preload), so no socket is shared between processes. This module lives
outside app/__init__.py so that the gunicorn master, which imports app.settings and
app.embedded_redis, never loads Flask or the app: workers forked after a reload (HUP)
import the code that is on disk then.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import signal
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, abort, g, jsonify, request
from werkzeug.exceptions import HTTPException

from app import __version__, embedded_redis, observe
from app.cache import Cache, CacheUnavailable, make_client
from app.errors import ProxyError
from app.fetch import Fetcher, Resolver, system_resolver
from app.front.views import bp as front_bp
from app.guard import AddressPolicy
from app.image.fresh_hits import FreshHits
from app.image.serve import ImageService
from app.image.views import bp as image_bp
from app.listener import arrived_on, is_loopback_peer
from app.log_format import JsonFormatter, TextFormatter
from app.memory import process_budget
from app.responses import IMAGE_SECURITY_HEADERS, error_response
from app.settings import Settings

log = logging.getLogger("image_proxy")


@dataclass
class Services:
    settings: Settings
    cache: Cache
    fetcher: Fetcher
    service: ImageService


def create_app(settings: Settings | None = None, *, resolver: Resolver = system_resolver) -> Flask:
    settings = settings or Settings.from_env(os.environ)
    embedded_maxmemory = settings.redis_maxmemory if settings.redis_url is None else None
    if settings.redis_url is None:
        # Outside gunicorn (which starts it in the master), the process owns its own.
        server = embedded_redis.start_owned(settings.redis_maxmemory)
        atexit.register(embedded_redis.stop_owned)
        settings = settings.replace(redis_url=server.url)
    assert settings.redis_url is not None

    _configure_logging(settings.log_format)
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    logging.getLogger("redis_lock").setLevel(logging.ERROR)  # its "failed to acquire" is our normal wait

    client = make_client(settings.redis_url, timeout=settings.redis_timeout, cluster=settings.redis_cluster)
    wait_client = make_client(settings.redis_url, timeout=settings.redis_timeout + 2, cluster=settings.redis_cluster)
    cache = Cache(client, wait_client, lock_expire=settings.lock_seconds, kept_cap=settings.source_cache_limit,
                  cluster=settings.redis_cluster)
    fetcher = Fetcher(
        timeout=settings.upstream_timeout,
        max_bytes=settings.max_source_bytes,
        via_token=settings.via_token,
        address_policy=AddressPolicy(settings.allow_networks, settings.allowed_ports),
        resolve=resolver,
        pool_size=max(4, settings.threads),
    )
    # Under gunicorn the master's ledger (one budget for all workers), else this process's own.
    memory = process_budget(settings.memory_budget, settings.workers, embedded_maxmemory, settings.threads)
    service = ImageService(settings, cache, fetcher, memory, **_recycling(settings))
    app.extensions["image_proxy"] = Services(settings, cache, fetcher, service)

    app.register_blueprint(image_bp)
    if settings.admin_token:
        # Without a token there is no /admin route at all: a 404, nothing to guess at.
        from app.admin.views import bp as admin_bp

        app.register_blueprint(admin_bp)
    if settings.front_page and not settings.signing_keys:
        # The page builds /image URLs in the browser, which cannot hold the signing key
        # (docs/front-page.md): with signing on, / is a 404 like FRONT_PAGE=off.
        app.register_blueprint(front_bp)
    _register_health_and_metrics(app)
    _register_error_handlers(app)
    observe.install(app)

    @app.after_request
    def version_header(response: Response) -> Response:
        # Which code answered: during a rolling upgrade (HUP, or one VM after another) the
        # operator watches this header change (docs/upgrades.md).
        response.headers["X-Image-Proxy-Version"] = __version__
        return response

    # Fresh cache hits skip Flask's machinery, with the same answer (app/image/fresh_hits.py).
    app.wsgi_app = FreshHits(app, app.wsgi_app)  # type: ignore[method-assign]
    return app


def _recycling(settings: Settings) -> dict[str, Any]:
    """Under gunicorn (its post_fork hook marks the worker), a worker leaves gracefully after
    RECYCLE_RENDERS renders, with a per-worker jitter of up to 10 % so they do not all leave at
    once: SIGTERM to itself is gunicorn's graceful exit, and the master forks a fresh worker.
    Outside gunicorn nothing is recycled."""
    if not os.environ.get(WORKER_MARK) or not settings.recycle_renders:
        return {}
    jitter = random.randint(0, settings.recycle_renders // 10)
    return {"recycle_after": settings.recycle_renders + jitter,
            "recycle": lambda: os.kill(os.getpid(), signal.SIGTERM)}


#: Set by gunicorn.conf.py's post_fork in each worker.
WORKER_MARK = "_IMAGE_PROXY_GUNICORN_WORKER"


def _configure_logging(log_format: str) -> None:
    # One access-log line per request is on the hit path: skip the caller lookup (a stack
    # walk per record) and the thread/process names no format here uses (logging HOWTO,
    # "Optimization").
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False
    logger = logging.getLogger("image_proxy")
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    # Every line one line, control characters escaped; json: nothing but the JSON object.
    formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    for handler in logger.handlers:
        handler.setFormatter(formatter)


def _register_health_and_metrics(app: Flask) -> None:
    @app.get("/healthz")
    def healthz() -> Response | tuple[Response, int]:
        try:
            app.extensions["image_proxy"].cache.ping()
        except CacheUnavailable as exc:
            # Redis's error names sockets and addresses: the log has it, the body a fixed reason.
            log.warning("healthz: %s", exc)
            return error_response(503, "redis unavailable")
        response = jsonify(status="ok", redis="ok")
        response.headers["Cache-Control"] = "no-store"
        return response

    settings: Settings = app.extensions["image_proxy"].settings

    @app.before_request
    def metrics_listener_serves_only_health_and_metrics() -> None:
        on_metrics_listener = bool(settings.metrics_bind) and arrived_on(request.environ, settings.metrics_bind)
        if on_metrics_listener and request.endpoint not in ("healthz", "metrics_view"):
            abort(404)

    @app.get("/metrics")
    def metrics_view() -> Response:
        from app.metrics import exposition

        # Request counts and timings are for the operator, not for anyone who can reach BIND
        # (0.0.0.0 on a multi-VM setup): only on METRICS_BIND when set, else loopback only.
        if settings.metrics_bind:
            if not arrived_on(request.environ, settings.metrics_bind):
                abort(404)
        elif not is_loopback_peer(request.remote_addr):
            abort(404)
        body, content_type = exposition()
        return Response(body, content_type=content_type, headers={"Cache-Control": "no-store"})


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ProxyError)
    def proxy_error(exc: ProxyError) -> Response:
        g.error_reason, g.error_kind = exc.message, exc.kind
        response = error_response(exc.status, exc.message, retry_after=exc.retry_after)
        response.headers.update(IMAGE_SECURITY_HEADERS)
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        response = error_response(exc.code or 500, exc.description or exc.name)
        for name, value in exc.get_headers():
            if name.lower() == "allow":
                # Werkzeug lists methods in set order; the contract names them "GET, HEAD".
                methods = {m.strip() for m in value.split(",")}
                ordered = [m for m in ("GET", "HEAD") if m in methods] + sorted(methods - {"GET", "HEAD"})
                response.headers["Allow"] = ", ".join(ordered)
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error (a bug)")
        g.error_reason, g.error_kind = f"internal error: {type(exc).__name__}", "internal"
        return error_response(500, "internal error; it has been logged")
