"""The hostile mix (issue #14, "Prove it"): does the service stay inside its memory budget?

Starts gunicorn (the project's gunicorn.conf.py, IMAGE_PROXY_MEMORY_BUDGET set) and a loopback
upstream serving, each under a fresh URL per request so every request is a miss:

  /big/<n>.jpg     a generated 48 MP noisy JPEG (just under 32 MiB)
  /anim/<n>.gif    an animation at the caps: 300 frames of 400x400 (48 MP in all)
  /icc/<n>.jpg     a small JPEG carrying a distinct 4 MiB junk ICC profile
  /slow/<n>.jpg    the 48 MP JPEG padded to exactly 32 MiB, trickled over ~8 s

then runs CLIENTS clients for DURATION s of w=0 AVIF requests over those, while one client
asks for a cached image in a loop, and samples the RSS of the whole process tree (master,
workers, embedded Redis) every 0.1 s. Reports the budget, the peak, whether a worker was
killed, the 500s and the hits' p50. Every loop is bounded in count and time; only 127.0.0.1
is contacted.

Admitted renders' estimates come from the JSON access log (`mem_estimate_mb`); each kind's
estimate is then set against its render's measured peak, rendered alone in a fresh process.

    python -m bench.chaos --only hostile      (or: make chaos CHAOS_ARGS="--only hostile")
"""

from __future__ import annotations

import io
import json
import random
import re
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import requests

from tests import processes

if TYPE_CHECKING:
    from bench.chaos import Env, Row

MB = 1024 * 1024
SOURCE_CAP = 32 * MB  # the default MAX_SOURCE_BYTES
BUDGET = "2G"  # the shipped unit's MemoryMax
CLIENTS = 16
DURATION = 60.0
KINDS = ("big", "anim", "icc", "slow")
#: Issue #20: renders served (200) in the mix, at least twice the 9 of 42 before it.
SERVED_TARGET = 18


# -- the sources --------------------------------------------------------------------------------


def _noise(size: tuple[int, int], seed: int, mode: str = "RGB", levels: int = 256):
    from PIL import Image

    rng = random.Random(seed)
    count = size[0] * size[1] * (3 if mode == "RGB" else 1)
    data = rng.randbytes(count).translate(bytes(i % levels for i in range(256)))
    return Image.frombytes(mode, size, data)


def noisy_48mp_jpeg(seed: int = 48) -> bytes:
    """8000x6000 of noise, at the highest JPEG quality that stays under the source cap; a
    different seed makes a different image (a distinct source of the same cost)."""
    image = _noise((8000, 6000), seed)
    for quality in (80, 70, 60, 50, 40):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        if buffer.tell() <= SOURCE_CAP - MB:
            return buffer.getvalue()
    raise RuntimeError("could not fit a 48 MP noisy JPEG under 32 MiB")


def animation_at_the_caps() -> bytes:
    # Two-colour noise keeps 300 frames of 400x400 (48 MP, under the 50 MP total) small enough
    # to fetch; the decoder and encoders still handle every pixel of every frame.
    frames = [_noise((400, 400), seed, "P", levels=2) for seed in range(300)]
    for frame in frames:
        frame.putpalette([0, 0, 0, 255, 255, 255])
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    return buffer.getvalue()


def with_junk_profile(small_jpeg: bytes, seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    junk = random.Random(seed).randbytes(4 * MB)
    Image.open(io.BytesIO(small_jpeg)).save(buffer, "JPEG", quality=85, icc_profile=junk)
    return buffer.getvalue()


class Sources:
    def __init__(self) -> None:
        self.big = noisy_48mp_jpeg()
        self.slow = self.big + b"\0" * (SOURCE_CAP - len(self.big))  # padding after EOI is ignored
        self.anim = animation_at_the_caps()
        buffer = io.BytesIO()
        _noise((1200, 800), 7).save(buffer, "JPEG", quality=85)
        self.small = buffer.getvalue()
        self._icc: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def icc(self, n: int) -> bytes:
        with self._lock:
            if n not in self._icc:
                if len(self._icc) > 64:
                    self._icc.clear()
                self._icc[n] = with_junk_profile(self.small, n)
            return self._icc[n]


class HostileUpstream:
    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self.stop_event = threading.Event()
        handler = type("Handler", (_Handler,), {"upstream": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def stop(self) -> None:
        self.stop_event.set()
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    upstream: HostileUpstream
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        match = re.fullmatch(r"/(big|anim|icc|slow|small)/([0-9]+)\.(jpg|gif)", self.path)
        if not match:
            self.send_error(404)
            return
        kind, n = match.group(1), int(match.group(2))
        sources = self.upstream.sources
        body = sources.icc(n) if kind == "icc" else getattr(sources, kind)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if kind != "slow":
                self.wfile.write(body)
                return
            chunk = 512 * 1024  # 64 chunks, 0.12 s apart: about 8 s for 32 MiB
            for start in range(0, len(body), chunk):
                if self.upstream.stop_event.is_set():
                    return
                self.wfile.write(body[start : start + chunk])
                time.sleep(0.12)
        except (BrokenPipeError, ConnectionResetError):
            pass


# -- measuring ------------------------------------------------------------------------------------


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeSampler:
    """Peak of the summed RSS of a process tree, sampled every `every` seconds."""

    def __init__(self, root: int, every: float = 0.1) -> None:
        self.root, self.every = root, every
        self.peak_kb = 0
        self.hwm_kb: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = processes.tree(self.root)
            self.peak_kb = max(self.peak_kb, sum(_status_kb(pid, "VmRSS") for pid in pids))
            for pid in pids:  # VmHWM catches spikes between samples, per process
                self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), _status_kb(pid, "VmHWM"))
            self._stop.wait(self.every)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _logged_estimates(log: str) -> list[float]:
    """mem_estimate_mb of every rendered request in the JSON access log."""
    estimates = []
    for line in log.splitlines():
        if '"mem_estimate_mb"' not in line:
            continue
        try:
            estimate = float(json.loads(line[line.index("{"):])["mem_estimate_mb"])
        except (ValueError, KeyError):
            continue
        if estimate:
            estimates.append(estimate)
    return estimates


def _estimated_and_measured(sources: Sources) -> dict[str, tuple[float, float]]:
    """Per kind: the admission estimate (app/render/estimate.py, from the header) and the
    render's measured peak, each render alone in a fresh process (tests/peak_rss.py)."""
    import subprocess
    import tempfile

    from app.render import RenderOptions
    from app.render.estimate import estimate_peak

    out = {}
    with tempfile.TemporaryDirectory(prefix="image-proxy-hostile-") as workdir:
        for kind, data in (("big", sources.big), ("anim", sources.anim), ("icc", sources.icc(0))):
            options = RenderOptions(width=0, quality=75, format="avif", max_frames=300)
            estimate = estimate_peak(data, options) / MB
            path = Path(workdir) / kind
            path.write_bytes(data)
            result = subprocess.run([sys.executable, "-m", "tests.peak_rss", str(path), "0", "avif"],
                                    capture_output=True, text=True, timeout=600)
            measured = float(json.loads(result.stdout)["render_mb"]) if result.returncode == 0 else float("nan")
            out[kind] = (estimate, measured)
    return out


# -- the scenario ---------------------------------------------------------------------------------


def hostile(env: Env, budget: str = BUDGET, clients: int = CLIENTS, duration: float = DURATION) -> list[Row]:
    from app.settings import _size
    from bench.chaos import Row, hit_loop, timed_get

    started = time.monotonic()
    sources = Sources()
    print(f"# hostile: sources made in {time.monotonic() - started:.0f} s", flush=True, file=sys.stderr)
    upstream = HostileUpstream(sources)
    try:
        server = env.gunicorn(memory_budget=budget, log_format="json")
        assert server.process is not None

        def url(kind: str, n: int, **params: object) -> str:
            source = upstream.url(f"{kind}/{n}.{'gif' if kind == 'anim' else 'jpg'}")
            return f"{server.base}/image?url={quote(source, safe='')}" + "".join(f"&{k}={v}" for k, v in params.items())

        hit_url = url("small", 0, w=200)
        timed_get(hit_url)
        give_up = time.monotonic() + 20  # /healthz answers once the first worker is up
        while len(server.workers()) < 2 and time.monotonic() < give_up:
            time.sleep(0.1)
        workers_before = set(server.workers())
        stop_at = time.monotonic() + duration
        results: list[tuple[str, int, float]] = []
        lock = threading.Lock()
        counter = iter(range(1, 10**6))

        def client(index: int) -> None:
            with requests.Session() as session:
                for round_ in range(1000):
                    if time.monotonic() >= stop_at:
                        return
                    kind = KINDS[(index + round_) % len(KINDS)]
                    with lock:
                        n = next(counter)
                    status, seconds, _ = timed_get(url(kind, n, w=0, format="avif"), session)
                    with lock:
                        results.append((kind, status, seconds))

        done = threading.Event()
        until: Callable[[], bool] = done.is_set
        with TreeSampler(server.process.pid) as sampler, ThreadPoolExecutor(1) as hitter:
            hits_future = hitter.submit(hit_loop, hit_url, until, 5000, 0.05)
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(client, range(clients)))
            done.set()
            hits = hits_future.result()
        workers_after = set(server.workers())
        log = server.log_path.read_text(errors="replace")
    finally:
        upstream.stop()

    budget_mb = _size(budget) / MB
    peak_mb = sampler.peak_kb / 1024
    killed = bool(re.search(r"SIGKILL|out of memory|Worker \(pid:[0-9]+\) was sent", log))
    killed = killed or workers_before != workers_after  # 5,000 requests per recycle: none here
    statuses = Counter(status for _, status, _ in results)
    by_kind = {kind: Counter(s for k, s, _ in results if k == kind) for kind in KINDS}
    hit_latencies = [t for s, t, _ in hits if s == 200]
    logged = _logged_estimates(log)
    pairs = _estimated_and_measured(sources)
    estimate_note = (
        f"admitted renders' logged estimates: {len(logged)}, max {max(logged, default=0):.0f} MB; "
        "estimated/measured peak MB per kind (each alone, w=0 AVIF): "
        + ", ".join(f"{kind} {e:.0f}/{m:.0f}" for kind, (e, m) in pairs.items())
    )
    within = peak_mb <= budget_mb * 1.10
    served = statuses.get(200, 0)
    failures = (statuses.get(500, 0) + statuses.get(-1, 0) + (0 if within else 1) + (1 if killed else 0)
                + (0 if served >= SERVED_TARGET else 1))
    notes = (
        f"renders served {served} of {len(results)} (target >= {SERVED_TARGET}"
        f"{'' if served >= SERVED_TARGET else ': MISSED'}); "
        f"budget {budget_mb:.0f} MB, tree peak {peak_mb:.0f} MB ({'within' if within else 'OVER'} budget+10 %), "
        f"max per-process VmHWM {max(sampler.hwm_kb.values(), default=0) / 1024:.0f} MB; "
        f"workers {len(workers_before)} unchanged: {workers_before == workers_after}, worker killed: {killed}; "
        f"statuses {dict(sorted(statuses.items()))}; "
        + "; ".join(f"{k}: {dict(sorted(c.items()))}" for k, c in by_kind.items())
        + f"; {estimate_note}"
    )
    return [
        Row("hostile mix", f"c{clients} w=0 AVIF for {duration:.0f} s: 48 MP noisy JPEG, 300-frame GIF, "
            "4 MiB junk ICC, trickled 32 MiB", len(results), failures, [t for _, _, t in results], notes=notes),
        Row("hostile: hits meanwhile", "1 client, hits in a loop", len(hits),
            sum(1 for s, _, _ in hits if s != 200), hit_latencies,
            notes=f"hit p50 {statistics.median(hit_latencies) * 1000:.0f} ms" if hit_latencies else "no hits"),
    ]
