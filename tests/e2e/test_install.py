"""The documented production install, executed as written, in a throwaway root directory, as
a throwaway user; then the installed service is started the way its systemd unit says and
serves an image.

The commands are read from the install block of the operator docs (docs/deployment.md),
so the docs and this test cannot drift. Only paths are moved into a
temporary directory (/opt/image-proxy, /etc/...) and the user name made unique; `systemctl`
lines are not run because this machine has no systemd as PID 1: instead the test checks
the installed unit with `systemd-analyze verify` / `security --offline` and starts its
ExecStart with its User, WorkingDirectory, Environment, EnvironmentFile and UMask.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from tests.conftest import ROOT, free_port
from tests.e2e.test_upgrade import copy_project
from tests.system_packages import ensure_binary

pytestmark = pytest.mark.e2e

DEBIAN_ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def install_block() -> list[str]:
    doc = ROOT / "docs" / "deployment.md"
    found = re.search(r"<!-- install:begin -->\n```sh\n(.*?)```\n<!-- install:end -->", doc.read_text(), re.S)
    if found:
        return [line for line in found.group(1).splitlines() if line.strip()]
    raise AssertionError("no <!-- install:begin --> block in docs/deployment.md")


def unit_settings(text: str) -> dict[str, list[str]]:
    """[Service] keys of a unit file, each with all its values in order."""
    section, found = "", {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


@pytest.fixture
def throwaway() -> Iterator[tuple[Path, str]]:
    """A root directory and a fresh system user name; the user is deleted afterwards."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("setpriv"):
        pytest.skip("the install test runs as root with useradd and setpriv (it creates a system user)")
    root = Path(tempfile.mkdtemp(prefix="image-proxy-install-", dir="/tmp"))
    root.chmod(0o755)  # the service user must reach its files, as under / on a real VM
    user = f"ipx-{uuid.uuid4().hex[:8]}"
    yield root, user
    subprocess.run(["userdel", user], capture_output=True, timeout=60)
    shutil.rmtree(root, ignore_errors=True)


def test_documented_install_works_as_written_and_the_installed_service_serves_an_image(throwaway, upstream):
    root, user = throwaway
    source = copy_project(root / "src")
    prefix, etc, units = root / "opt" / "image-proxy", root / "etc", root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    port = free_port()

    def moved(text: str) -> str:
        text = text.replace("/opt/image-proxy", str(prefix)).replace("/etc/systemd/system/", f"{units}/")
        text = text.replace("/etc/image-proxy.env", f"{etc}/image-proxy.env")
        # The user name, where it stands alone (not in a path or a file name).
        return re.sub(r"(?<![\w./-])image-proxy(?![\w./-])", user, text)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGE_PROXY_", "PROMETHEUS_", "VIRTUAL_ENV",
                                                                     "PYTHON"))}
    env["PATH"] = DEBIAN_ROOT_PATH  # a fresh Debian root shell: python3 is /usr/bin/python3
    ran, skipped = [], []
    for line in install_block():
        if line.startswith(("systemctl ", "curl ")):
            skipped.append(line)  # no systemd as PID 1 here; the service is started below
            continue
        command = moved(line)
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=source, env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        ran.append(command)
    assert any(line.startswith("make install") for line in ran) and any(line.startswith("useradd") for line in ran)
    assert {line.split()[0] for line in skipped} <= {"systemctl", "curl"}

    # The unit as installed, with the same paths moved: systemd-analyze checks it for real.
    unit_path = units / "image-proxy.service"
    unit_path.write_text(moved(unit_path.read_text()))
    analyze = ensure_binary("systemd-analyze", "systemd")
    verify = subprocess.run([analyze, "verify", str(unit_path)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert verify.returncode == 0, verify.stderr
    # --offline: judge the file itself, no running systemd needed (systemd >= 252, Debian 12).
    security = subprocess.run([analyze, "security", "--offline=yes", str(unit_path)],
                              capture_output=True, text=True, timeout=120, env=env)
    exposure = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert exposure and float(exposure.group(1)) <= 2.5, security.stdout[-2000:]

    # Runtime only, not editable, read-only to the service user.
    venv_python = prefix / "venv" / "bin" / "python"
    for tool in ("pytest", "hypothesis", "ruff"):
        assert subprocess.run([venv_python, "-c", f"import {tool}"], capture_output=True).returncode != 0, tool
    location = subprocess.run([venv_python, "-c", "import app.factory; print(app.factory.__file__)"],
                              capture_output=True, text=True, cwd="/", check=True).stdout.strip()
    assert location.startswith(str(prefix / "venv")), f"installed, not linked to the checkout: {location}"
    as_user = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]
    for target in (prefix / "wsgi.py", Path(location), prefix / "venv" / "bin"):
        probe = subprocess.run([*as_user, "test", "-w", str(target)], capture_output=True)
        assert probe.returncode != 0, f"{target} is writable by the service user"

    # The operator's settings, in the env file the docs created (root:user 0640).
    env_file = etc / "image-proxy.env"
    assert oct(env_file.stat().st_mode & 0o777) == "0o640"
    env_file.write_text(f"IMAGE_PROXY_BIND=127.0.0.1:{port}\nIMAGE_PROXY_ALLOW_NETWORKS=127.0.0.0/8\n")

    service = unit_settings(unit_path.read_text())
    assert service["User"] == [user] and service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    run_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    for assignment in service.get("Environment", []):
        key, value = assignment.split("=", 1)
        run_env[key] = value
    for line in Path(service["EnvironmentFile"][0].lstrip("-")).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            run_env[key] = value
    umask = int(service["UMask"][0], 8)
    log_path = root / "service.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*as_user, *shlex.split(service["ExecStart"][0])], cwd=service["WorkingDirectory"][0], env=run_env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=lambda: os.umask(umask),
        )
    try:
        base = f"http://127.0.0.1:{port}"
        give_up = time.monotonic() + 60
        while time.monotonic() < give_up and process.poll() is None:
            try:
                if requests.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        assert process.poll() is None, log_path.read_text()[-3000:]
        url = f"{base}/image?url={quote(upstream.url('photos/portrait_1200x1800.jpg'), safe='')}&w=120&format=avif"
        response = requests.get(url, timeout=60)
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"] == "image/avif" and response.content[4:12] == b"ftypavif"
        assert response.headers["X-Cache"] == "MISS"
        assert requests.get(url, timeout=60).headers["X-Cache"] == "HIT", "the embedded Redis works as that user"
        master_uid = int(Path(f"/proc/{process.pid}/status").read_text().split("Uid:")[1].split()[0])
        assert master_uid != 0, "the service does not run as root"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(45)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
    assert process.returncode == 0, log_path.read_text()[-3000:]
