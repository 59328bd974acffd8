"""`make bench`: the service against the in-process limit, in one run, on this machine.

Starts its own loopback upstream (a separate process serving ../shared/corpus/photos), the
service (real gunicorn with gunicorn.conf.py defaults and its embedded Redis), and runs:

- miss: every request a fresh upstream URL, so each pays fetch + decode + resize + encode;
- limit: the same fetch + render() in-process (no HTTP server, no Redis), in 1 or N forked
  processes: what the pipeline costs with no service around it;
- hit: the corpus primed, then requested again (Python client), and `wrk` on one URL
  against the service and against a bare gunicorn + Flask view returning the same bytes
  from the same Redis (the hit-path floor).

for webp/avif x w 640/1920 at c1 and c4, then prints one table: img/s, p50/p95 ms, KB per
pass, CPU ms per image, peak RSS of the whole service tree, and the ratio to the limit.
Bounded: ~6 min by default, ~1 min with --quick. Only 127.0.0.1 is contacted.

    python -m bench.run [--quick] [--rounds N] [--widths 640,1920] [--formats webp,avif] [--conc 1,4]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from tests.conftest import ROOT, Gunicorn, free_port, gunicorn_env
from tests.processes import is_redis, redis_socket, tree
from tests.upstream import corpus_dir

PHOTOS = sorted(p.name for p in (corpus_dir() / "photos").iterdir() if p.suffix in (".jpg", ".png"))


@dataclass
class Result:
    target: str  # ours | limit | bare
    mode: str  # miss | hit | inproc | wrk
    w: int
    fmt: str
    conc: int
    images: int
    seconds: float
    latencies: list[float]
    bytes_per_pass: int = 0
    cpu_s: float = 0.0
    peak_rss: int = 0
    errors: int = 0
    peak_rss_redis: int = 0  # the embedded redis-server's own peak (inside peak_rss)
    peak_rss_without_redis: int = 0  # gunicorn's master and workers

    @property
    def img_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def pct(self, p: float) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(len(lat) * p))] * 1000 if lat else 0.0


# -- process-tree sampling ------------------------------------------------------------------


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


class Monitor:
    """Peak summed RSS and CPU time of a process tree, sampled every 50 ms; also the peaks of the
    tree without its redis-server and of the redis-server alone (Redis holds the cache up to its
    maxmemory, whatever the workers do, so the workers' memory is reported apart)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak = self.peak_redis = self.peak_without_redis = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        sizes = {pid: rss(pid) for pid in tree(self.root)}
        redis = sum(size for pid, size in sizes.items() if is_redis(pid))
        total = sum(sizes.values())
        self.peak = max(self.peak, total)
        self.peak_redis = max(self.peak_redis, redis)
        self.peak_without_redis = max(self.peak_without_redis, total - redis)

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> Monitor:
        self.cpu_start = cpu_seconds(tree(self.root))
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu = cpu_seconds(tree(self.root)) - self.cpu_start


# -- clients ------------------------------------------------------------------------------


def load(port: int, paths: list[str], conc: int, headers: dict[str, str] | None = None) -> tuple[float, list, int, int]:
    """GET every path with `conc` keep-alive connections; (seconds, latencies, bytes, errors)."""
    lock = threading.Lock()
    queue = list(reversed(paths))
    latencies: list[float] = []
    total = [0, 0]  # bytes, errors

    def worker() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if not queue:
                    break
                path = queue.pop()
            started = time.perf_counter()
            try:
                connection.request("GET", path, headers=headers or {})
                response = connection.getresponse()
                body = response.read()
                ok = response.status == 200 and (body[:4] == b"RIFF" or body[4:8] == b"ftyp")
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                ok, body = False, b""
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                total[0] += len(body) if ok else 0
                total[1] += 0 if ok else 1
        connection.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        for _ in range(conc):
            pool.submit(worker)
    return time.perf_counter() - started, latencies, total[0], total[1]


def image_path(upstream_port: int, photo: str, w: int, fmt: str, q: int | str, nonce: str) -> str:
    source = f"http://127.0.0.1:{upstream_port}/v/{nonce}/photos/{photo}"
    return f"/image?url={quote(source, safe='')}&w={w}&q={q}&format={fmt}"


# -- the in-process limit -----------------------------------------------------------------


def render_quality(q: int | str):  # type: ignore[no-untyped-def]
    """The RenderOptions quality for --q: a number, or q=auto at the default target."""
    from app.render import AutoQuality
    from app.settings import Settings

    return AutoQuality(Settings().auto_quality_target) if q == "auto" else q


def quality_arg(text: str) -> int | str:
    return text if text == "auto" else int(text)


def _limit_one(args: tuple[str, int, str, int | str]) -> tuple[float, int, float]:
    import requests

    from app.render import RenderOptions, render

    url, w, fmt, q = args
    cpu0, started = time.process_time(), time.perf_counter()
    body = requests.get(url, timeout=60).content
    out = render(body, RenderOptions(width=w, quality=render_quality(q), format=fmt))
    return time.perf_counter() - started, len(out.body), time.process_time() - cpu0


def run_limit(upstream_port: int, w: int, fmt: str, q: int | str, conc: int, rounds: int) -> Result:
    jobs = [(f"http://127.0.0.1:{upstream_port}/v/{uuid.uuid4().hex}/photos/{p}", w, fmt, q)
            for _ in range(rounds) for p in PHOTOS]
    with ProcessPoolExecutor(conc) as pool:
        list(pool.map(_limit_one, jobs[: conc]))  # fork and import before timing
        monitor = Monitor(os.getpid())
        with monitor:
            started = time.perf_counter()
            results = list(pool.map(_limit_one, jobs))
            seconds = time.perf_counter() - started
    return Result("limit", "inproc", w, fmt, conc, len(results), seconds, [r[0] for r in results],
                  bytes_per_pass=sum(r[1] for r in results) // rounds, cpu_s=sum(r[2] for r in results),
                  peak_rss=monitor.peak)


# -- the service --------------------------------------------------------------------------


def run_service(server: Gunicorn, upstream_port: int, w: int, fmt: str, q: int | str, conc: int, rounds: int,
                mode: str) -> Result:
    assert server.process is not None
    if mode == "miss":
        paths = [image_path(upstream_port, p, w, fmt, q, uuid.uuid4().hex) for _ in range(rounds) for p in PHOTOS]
    else:
        nonce = uuid.uuid4().hex
        primed = [image_path(upstream_port, p, w, fmt, q, nonce) for p in PHOTOS]
        load(server.port, primed, 1)
        paths = primed * 10
    load(server.port, [image_path(upstream_port, PHOTOS[0], w, fmt, q, "warm" + mode + fmt)], 1)
    with Monitor(server.process.pid) as monitor:
        seconds, latencies, size, errors = load(server.port, paths, conc)
    passes = rounds if mode == "miss" else 10
    return Result("ours", mode, w, fmt, conc, len(paths) - errors, seconds, latencies, size // passes,
                  monitor.cpu, monitor.peak, errors, monitor.peak_redis, monitor.peak_without_redis)


def run_wrk(port: int, path: str, conc: int, seconds: int = 5) -> Result | None:
    wrk = shutil.which("wrk")
    if not wrk:
        return None
    command = [wrk, f"-t{min(conc, 2)}", f"-c{conc}", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30).stdout
    rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([0-9.]+)(us|ms|s)", out)
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    latency = float(p50.group(1)) * scale[p50.group(2)] if p50 else 0.0  # type: ignore[union-attr]
    errors = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: ([0-9]+)", out)) else 0
    return Result("", "wrk", 0, "", conc, int(rate * seconds), float(seconds), [latency], errors=errors)


BARE_APP = '''
import os, redis
from flask import Flask, Response
app = Flask(__name__)
client = redis.Redis.from_url(os.environ["BARE_REDIS_URL"])
KEY = os.environ["BARE_KEY"]
@app.get("/bare")
def bare():
    return Response(client.get(KEY), content_type="image/webp")
'''


def start_bare(redis_url: str, key: str, workdir: Path) -> subprocess.Popen[bytes]:
    (workdir / "bare_app.py").write_text(BARE_APP)
    port = free_port()
    env = {**os.environ, "BARE_REDIS_URL": redis_url, "BARE_KEY": key, "PYTHONPATH": str(workdir)}
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-w", "2", "-k", "gthread", "--threads", "32", "--no-control-socket",
         "-b", f"127.0.0.1:{port}", "bare_app:app"],
        env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    process.port = port  # type: ignore[attr-defined]
    give_up = time.monotonic() + 20
    while time.monotonic() < give_up:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/bare")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.1)
    process.terminate()
    raise RuntimeError("bare app did not start")


def hit_path_with_wrk(server: Gunicorn, upstream_port: int, q: int | str, workdir: Path) -> list[Result]:
    """wrk on one cached URL, against the service and a bare view serving the same bytes
    from the same Redis."""
    hit = image_path(upstream_port, "panda_3872x2592.jpg", 640, "webp", q, "wrk")
    load(server.port, [hit], 1)
    redis_url = _service_redis_url(server)
    key = _entry_key_for(upstream_port, "panda_3872x2592.jpg", q)
    bare = start_bare(redis_url, key, workdir) if redis_url else None
    results = []
    try:
        for conc in (1, 4):
            ours = run_wrk(server.port, hit, conc)
            if ours:
                ours.target = "ours (/image hit)"
                results.append(ours)
            floor = run_wrk(bare.port, "/bare", conc) if bare is not None else None  # type: ignore[attr-defined]
            if floor:
                floor.target = "bare Flask + Redis GET"
                results.append(floor)
    finally:
        if bare is not None:
            bare.terminate()
            bare.wait(10)
    return results


# -- report -------------------------------------------------------------------------------


def apart(r: Result) -> str:
    if not r.peak_rss_without_redis:
        return "-"
    return f"{r.peak_rss_without_redis / 2**20:.0f} / {r.peak_rss_redis / 2**20:.0f}"


def table(results: list[Result]) -> str:
    limits = {(r.w, r.fmt, r.conc): r.img_per_s for r in results if r.target == "limit"}
    header = (
        "target | mode | w | fmt | conc | img/s | p50 ms | p95 ms | KB/pass | CPU ms/img | peak RSS MB | "
        "of which gunicorn / redis MB | x limit"
    )
    rows = [f"| {header} |", "|" + "---|" * (header.count("|") + 1)]
    for r in results:
        if r.mode == "wrk":
            continue
        limit = limits.get((r.w, r.fmt, r.conc))
        ratio = f"{r.img_per_s / limit:.2f}" if limit and r.mode != "hit" else "-"
        cpu = f"{r.cpu_s * 1000 / r.images:.1f}" if r.images else "-"
        rows.append(f"| {r.target} | {r.mode} | {r.w} | {r.fmt} | {r.conc} | {r.img_per_s:.2f} | {r.pct(0.5):.1f} | "
                    f"{r.pct(0.95):.1f} | {r.bytes_per_pass // 1024} | {cpu} | {r.peak_rss / 2**20:.0f} | "
                    f"{apart(r)} | {ratio} |")
    wrk = [r for r in results if r.mode == "wrk"]
    if wrk:
        rows += ["", "| wrk on one cached URL | conc | req/s | p50 ms | non-2xx |", "|---|---|---|---|---|"]
        rows += [f"| {r.target} | {r.conc} | {r.img_per_s:.0f} | {r.latencies[0] * 1000:.2f} | {r.errors} |"
                 for r in wrk]
    return "\n".join(rows)


@contextmanager
def upstream_and_service(prefix: str) -> Iterator[tuple[Gunicorn, int, Path]]:
    """A loopback upstream in its own process and the service (gunicorn.conf.py defaults,
    embedded Redis); yields (server, upstream port, work dir) and stops both by PID."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    upstream = subprocess.Popen([sys.executable, "-m", "tests.upstream"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
    try:
        assert upstream.stdout is not None
        upstream_port = int(upstream.stdout.readline())
        port = free_port()
        server = Gunicorn(gunicorn_env(bind=f"127.0.0.1:{port}", allow_networks="127.0.0.0/8"), port,
                          workdir / "gunicorn.log")
        try:
            server.start()
            yield server, upstream_port, workdir
        finally:
            server.stop()
    finally:
        upstream.terminate()
        upstream.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="w=640 only, one round, c1 and c4 (~1 min)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--widths", default="640,1920")
    parser.add_argument("--formats", default="webp,avif")
    parser.add_argument("--conc", default="1,4")
    parser.add_argument("--q", type=quality_arg, default=75, help="1..100 or auto")
    parser.add_argument("--skip-limit", action="store_true")
    parser.add_argument("--wrk-only", type=int, default=0, metavar="REPS",
                        help="only the wrk hit path, REPS times against a fresh service each, with medians "
                             "(with c4 on 2 workers, wrk's 4 connections can all land on one worker)")
    parser.add_argument("--out", default=str(ROOT / "bench-results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.widths = 1, "640"
    widths = [int(w) for w in args.widths.split(",")]
    formats = args.formats.split(",")
    concs = [int(c) for c in args.conc.split(",")]

    if args.wrk_only:
        return wrk_reps(args.wrk_only, args.q)
    results: list[Result] = []
    started = time.monotonic()
    with upstream_and_service("image-proxy-bench-") as (server, upstream_port, workdir):
        for w in widths:
            for fmt in formats:
                for conc in concs:
                    if not args.skip_limit:
                        results.append(run_limit(upstream_port, w, fmt, args.q, conc, args.rounds))
                    results.append(run_service(server, upstream_port, w, fmt, args.q, conc, args.rounds, "miss"))
                    results.append(run_service(server, upstream_port, w, fmt, args.q, conc, args.rounds, "hit"))
                    print(f"# w={w} {fmt} c{conc} done at {time.monotonic() - started:.0f} s", file=sys.stderr)
        results.extend(hit_path_with_wrk(server, upstream_port, args.q, workdir))
    report = table(results)
    print(report)
    print(f"\nq={args.q}, rounds={args.rounds}, {len(PHOTOS)} photos, {os.cpu_count()} cores, "
          f"{time.monotonic() - started:.0f} s in all")
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"bench-{stamp}.md").write_text(report + "\n")
    (out / f"bench-{stamp}.jsonl").write_text("\n".join(json.dumps(asdict(r)) for r in results) + "\n")
    return 0


def wrk_reps(reps: int, q: int | str) -> int:
    """The wrk hit path `reps` times, each on a fresh service; prints each run's ratios to
    the bare view and their medians (one run's c4 depends on how wrk's connections happen
    to split between the two workers)."""
    ratios: dict[int, list[float]] = {1: [], 4: []}
    scaling: list[float] = []
    for rep in range(reps):
        with upstream_and_service("image-proxy-wrk-") as (server, upstream_port, workdir):
            measured = hit_path_with_wrk(server, upstream_port, q, workdir)
        runs = {(r.target.startswith("ours"), r.conc): r.img_per_s for r in measured}
        for conc in (1, 4):
            ratios[conc].append(runs[(True, conc)] / runs[(False, conc)])
        scaling.append(runs[(True, 4)] / runs[(True, 1)])
        print(f"rep {rep}: ours {runs[(True, 1)]:.0f} / {runs[(True, 4)]:.0f} req/s, bare {runs[(False, 1)]:.0f} / "
              f"{runs[(False, 4)]:.0f}; ours / bare c1 {ratios[1][-1]:.2f}, c4 {ratios[4][-1]:.2f}", flush=True)
    print(f"medians over {reps}: ours / bare c1 {statistics.median(ratios[1]):.2f}, "
          f"c4 {statistics.median(ratios[4]):.2f}; ours c4 / c1 {statistics.median(scaling):.2f}")
    return 0


def _service_redis_url(server: Gunicorn) -> str | None:
    pid = server.embedded_redis_pid()
    return f"unix://{redis_socket(pid)}" if pid else None


def _entry_key_for(upstream_port: int, photo: str, q: int | str) -> str:
    """The Redis key the service stores the wrk URL's image under."""
    from app.guard import parse_source_url
    from app.image.params import ImageRequest

    url = parse_source_url(f"http://127.0.0.1:{upstream_port}/v/wrk/photos/{photo}")
    return ImageRequest(url, 640, render_quality(q), "webp").cache_key().entry


if __name__ == "__main__":
    raise SystemExit(main())
