"""gunicorn settings and server hooks for image-proxy.

Every value comes from the IMAGE_PROXY_* settings (app/settings.py), so a bad variable
stops the master before any worker starts, with a message naming it. gunicorn's own
GUNICORN_CMD_ARGS and command-line flags still override anything here.

Why gthread with 2 workers x 64 threads on 2 cores: renders are CPU-bound and Pillow
releases the GIL while decoding, resizing and encoding, so two processes fill two cores and
RENDER_SLOTS=2 renders per worker keep both busy while one of them fetches. Misses that
fetch or render are capped at MAX_QUEUE (THREADS - THREADS/8 = 56 by default) per worker
and shed by time (app/image/admission.py), so an eighth of the threads is always free for
cache hits, which take one Redis GET. Dedup waiters hold a thread but no miss place.
Threads are cheap here (a parked thread is a few KB of RSS).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile

# prometheus_client picks its multiprocess mode when a worker imports it: the directory
# must be in the environment the workers inherit. Set it before anything else, once (a HUP
# re-runs this file in the same master, which keeps the directory and its counters).
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="image-proxy-metrics-")

# The master imports only these two modules of the app (plus the standard library): no
# Flask, Pillow, requests, redis or prometheus_client, and not app.factory. A HUP
# (`systemctl reload`) re-runs this file and forks new workers, which then import the code
# on disk; tests/unit/test_master_imports.py keeps it so. app.settings is dropped first so a
# reload also parses the settings with the new code (a new version may add a setting).
sys.modules.pop("app.settings", None)
import app.embedded_redis as embedded_redis  # noqa: E402
import app.memory as memory  # noqa: E402
from app.settings import Settings, SettingsError, unknown_variables  # noqa: E402

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
if _settings.metrics_bind:
    # A second listener for /metrics and /healthz only (the app checks which one a request
    # came in on), so the scrape port can be firewalled apart from the service port.
    bind.append(_settings.metrics_bind)
workers = _settings.workers
threads = _settings.threads
worker_class = "gthread"
# The request budget bounds every request (fetch, waits, render), so a worker that stays
# silent past it plus a margin is stuck; HUP and TERM let every in-flight request finish.
timeout = int(_settings.request_budget + 30)
graceful_timeout = _settings.graceful_seconds
keepalive = 5
# A 2048-character source URL, percent-encoded, plus the other parameters.
limit_request_line = 8190
# Workers recycle themselves after IMAGE_PROXY_RECYCLE_RENDERS renders (app/factory.py):
# renders are what can leak, and a request count would recycle a worker every few seconds
# under a flood of cache hits (thousands per second). This is only a far backstop.
max_requests = 1_000_000
max_requests_jitter = 100_000
accesslog = None  # the app writes one structured line per request itself
errorlog = "-"
loglevel = "info"
capture_output = True
# gunicorn 27's control socket lives at one fixed path per user, which two instances on one
# machine (a blue/green deploy, the two-instance test) would fight over; nothing here uses it.
control_socket_disable = True

def _effective_settings(server: object) -> None:
    """gunicorn's own flags (GUNICORN_CMD_ARGS, the command line) may change the thread or
    worker count after this file set them: check the settings again with the counts the
    workers will really have, and pass those to the workers, so derived values (misses in
    flight per worker) follow them."""
    cfg = server.cfg  # type: ignore[attr-defined]
    effective = {"IMAGE_PROXY_THREADS": str(cfg.threads), "IMAGE_PROXY_WORKERS": str(cfg.workers)}
    try:
        Settings.from_env({**os.environ, **effective})
    except SettingsError as exc:
        sys.stderr.write(f"image-proxy: with gunicorn's --threads {cfg.threads} --workers {cfg.workers}: {exc}\n")
        sys.exit(2)
    os.environ.update(effective)


def on_starting(server: object) -> None:
    _effective_settings(server)
    # One memory ledger for all workers (app/memory.py): made before they fork, named to them
    # in the environment, holding the budget they all admit renders and bodies into.
    embedded_maxmemory = _settings.redis_maxmemory if _settings.redis_url is None else None
    workers_now = int(os.environ["IMAGE_PROXY_WORKERS"])  # gunicorn's flag may have changed it
    budget, baseline = memory.service_budget(_settings.memory_budget, workers_now, embedded_maxmemory)
    if budget <= baseline:
        sys.stderr.write(
            f"image-proxy: IMAGE_PROXY_MEMORY_BUDGET={budget // memory.MB}M leaves nothing for renders: "
            f"the idle service alone uses about {baseline // memory.MB}M\n"
        )
        sys.exit(2)
    # A row per reservation in flight: sized from the thread count the workers will really have.
    rows = memory.ledger_rows(workers_now, int(os.environ["IMAGE_PROXY_THREADS"]))
    os.environ[memory.LEDGER_ENV] = memory.create_ledger(budget, baseline, rows=rows)
    logging.getLogger("gunicorn.error").info(
        "memory budget %d MB, %d MB of it for renders and fetched bodies; ledger %s (%d rows)",
        budget // memory.MB, (budget - baseline) // memory.MB, os.environ[memory.LEDGER_ENV], rows,
    )
    if _settings.redis_url is None:
        # Supervised: restarted on the same socket if it dies (app/embedded_redis.py).
        redis_server = embedded_redis.start_owned(_settings.redis_maxmemory, supervise=True)
        # Workers fork from this master and read their settings from the environment.
        os.environ["IMAGE_PROXY_REDIS_URL"] = redis_server.url
        logging.getLogger("gunicorn.error").info(
            "embedded redis-server pid %s on %s", redis_server.pid, redis_server.socket_path
        )


def post_fork(server: object, worker: object) -> None:
    # The fork copied the master's modules: drop the app's, so this worker imports the app
    # package, its settings and everything else from disk as it is now (after an upgrade,
    # the new version), not the copies the master loaded when it started.
    for name in [name for name in sys.modules if name == "app" or name.startswith("app.")]:
        del sys.modules[name]
    # Tells the app it runs in a gunicorn worker, which may recycle itself (app/factory.py).
    os.environ["_IMAGE_PROXY_GUNICORN_WORKER"] = "1"


def child_exit(server: object, worker: object) -> None:
    # Dead workers' metric files are folded into archives, so the directory stays bounded
    # and counters never go backwards (app/metrics_cleanup.py). It runs as a short child
    # process: importing prometheus_client here would load it into the master and so into
    # every later worker, whatever version is installed then. gunicorn's reaper collects it.
    live = [str(pid) for pid in server.WORKERS]  # type: ignore[attr-defined]
    try:
        subprocess.Popen(
            [sys.executable, "-m", "app.metrics_cleanup", str(worker.pid), *live],  # type: ignore[attr-defined]
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    except OSError:
        logging.getLogger("gunicorn.error").exception("could not archive metrics of worker %s", worker.pid)  # type: ignore[attr-defined]


def on_exit(server: object) -> None:
    embedded_redis.stop_owned()
    if os.environ.get(memory.LEDGER_ENV):
        memory.remove_ledger(os.environ[memory.LEDGER_ENV])
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if directory.startswith(tempfile.gettempdir()) and "image-proxy-metrics-" in directory:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
