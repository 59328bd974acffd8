"""Cache hits through the shipped nginx edge (TLS) against the same hits at gunicorn.

Starts a loopback upstream, the service (gunicorn.conf.py defaults, embedded Redis) and Debian
nginx with deploy/nginx.conf (the test's own self-signed certificate, tests/e2e/test_nginx.py),
primes one URL until nginx answers it from its cache, then runs `wrk` on it for 5 s at c1
and c4, at the edge and straight at gunicorn. The shipped `limit_req` (20 r/s per client,
burst 100) would answer one benchmarking client with 429s, so it is taken out of this
copy of the config. Only 127.0.0.1 is contacted; everything started is stopped by PID.

    python -m bench.edge_hits
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from tests.conftest import Gunicorn, free_port, gunicorn_env
from tests.e2e.test_nginx import Nginx
from tests.system_packages import ensure_binary
from tests.upstream import Upstream


def wrk(url: str, conc: int, seconds: int = 5) -> tuple[float, str, str]:
    out = subprocess.run(["wrk", "-t1", f"-c{conc}", f"-d{seconds}s", "--latency", url],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: ([0-9]+)", out)
    return rate, p50, non2xx.group(1) if non2xx else "0"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="image-proxy-edge-") as workdir:
        upstream = Upstream().start()
        port = free_port()
        server = Gunicorn(gunicorn_env(bind=f"127.0.0.1:{port}", allow_networks="127.0.0.0/8"), port,
                          Path(workdir) / "gunicorn.log").start()
        edge = Nginx(ensure_binary("nginx", "nginx-light"), Path(workdir) / "nginx", port)
        try:
            site = Path(workdir) / "nginx" / "site.conf"
            site.write_text("\n".join(line for line in site.read_text().splitlines()
                                      if not line.strip().startswith("limit_req ")))
            os.kill(edge.process.pid, signal.SIGHUP)  # nginx re-reads its config
            time.sleep(1.5)
            path = f"/image?url={quote(upstream.url('photos/panda_3872x2592.jpg'), safe='')}&w=640&format=webp"
            for _ in range(3):
                response = edge.get(path)
            print(f"edge cache: {response.headers.get('X-Edge-Cache')} {response.status_code}")
            print("| target | conc | req/s | p50 | non-2xx |\n|---|---|---|---|---|")
            for conc in (1, 4):
                for name, base in (("nginx edge (TLS)", f"https://127.0.0.1:{edge.port}"), ("gunicorn (Redis hit)",
                                                                                          server.base)):
                    rate, p50, bad = wrk(base + path, conc)
                    print(f"| {name} | {conc} | {rate:.0f} | {p50} | {bad} |")
        finally:
            edge.stop()
            server.stop()
            upstream.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
