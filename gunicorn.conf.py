"""gunicorn settings and server hooks for image-proxy.

Every value comes from the IMAGE_PROXY_* settings (app/settings.py), so a bad variable
stops the master before any worker starts, with a message naming it. gunicorn's own
GUNICORN_CMD_ARGS and command-line flags still override anything here.

Why gthread with 2 workers x 32 threads on 2 cores: renders are CPU-bound and Pillow
releases the GIL while decoding, resizing and encoding, so two processes fill two cores and
RENDER_SLOTS=2 renders per worker keep both busy while one of them fetches. Misses in flight
(fetching, waiting for a render slot or for another request's render) are capped at
MAX_QUEUE=24 per worker, answered with an immediate 503 beyond it, so 8 threads per worker
are always free for cache hits, which take one Redis GET: hits never queue behind misses,
even when every upstream trickles. Threads are cheap here (a parked thread is a few KB of RSS).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

# prometheus_client picks its multiprocess mode at import, and importing anything from
# `app` imports it: the directory must exist before the first `from app ...` line.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="image-proxy-metrics-")

from app import embedded_redis, memory
from app.settings import Settings, SettingsError, unknown_variables

try:
    _settings = Settings.from_env(os.environ)
except SettingsError as exc:
    sys.stderr.write(f"image-proxy: {exc}\n")
    sys.exit(2)


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas before the workers fork (they inherit the setting).

    With 32 threads per worker glibc would keep up to 8 x cores arenas, each holding freed
    image buffers it never returns: a 3,000-request soak grew the workers' RSS by 41 % with
    the default and by 7 % with 2 arenas (BENCHMARKS.md, "Memory"). MALLOC_ARENA_MAX in the
    environment, if set, wins.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


_limit_malloc_arenas()

for _name in unknown_variables(os.environ):
    sys.stderr.write(f"image-proxy: warning: {_name} is not a setting this version reads (typo?)\n")

bind = [_settings.bind]
workers = _settings.workers
threads = _settings.threads
worker_class = "gthread"
# Above the longest request: upstream deadline plus waiting for a render.
timeout = int(_settings.upstream_timeout + _settings.request_budget + 10)
graceful_timeout = 30
keepalive = 5
# A 2048-character source URL, percent-encoded, plus the other parameters.
limit_request_line = 8190
# Recycle workers now and then so a slow leak in a native library cannot grow forever.
max_requests = 5000
max_requests_jitter = 500
accesslog = None  # the app writes one structured line per request itself
errorlog = "-"
loglevel = "info"
capture_output = True
# gunicorn 27's control socket lives at one fixed path per user, which two instances on one
# machine (a blue/green deploy, the two-instance test) would fight over; nothing here uses it.
control_socket_disable = True

def on_starting(server: object) -> None:
    # One memory ledger for all workers (app/memory.py): made before they fork, named to them
    # in the environment, holding the budget they all admit renders and bodies into.
    budget, baseline = memory.service_budget(
        _settings.memory_budget, _settings.workers, _settings.redis_maxmemory if _settings.redis_url is None else None
    )
    if budget <= baseline:
        sys.stderr.write(
            f"image-proxy: IMAGE_PROXY_MEMORY_BUDGET={budget // memory.MB}M leaves nothing for renders: "
            f"the idle service alone uses about {baseline // memory.MB}M\n"
        )
        sys.exit(2)
    os.environ[memory.LEDGER_ENV] = memory.create_ledger(budget, baseline)
    logging.getLogger("gunicorn.error").info(
        "memory budget %d MB, %d MB of it for renders and fetched bodies; ledger %s", budget // memory.MB,
        (budget - baseline) // memory.MB, os.environ[memory.LEDGER_ENV],
    )
    if _settings.redis_url is None:
        redis_server = embedded_redis.start_owned(_settings.redis_maxmemory)
        # Workers fork from this master and read their settings from the environment.
        os.environ["IMAGE_PROXY_REDIS_URL"] = redis_server.url
        logging.getLogger("gunicorn.error").info(
            "embedded redis-server pid %s on %s", redis_server.pid, redis_server.socket_path
        )


def child_exit(server: object, worker: object) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]


def on_exit(server: object) -> None:
    embedded_redis.stop_owned()
    if os.environ.get(memory.LEDGER_ENV):
        memory.remove_ledger(os.environ[memory.LEDGER_ENV])
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if directory.startswith(tempfile.gettempdir()) and "image-proxy-metrics-" in directory:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
