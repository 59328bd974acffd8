"""Headless Chromium for tests: install Debian's `chromium` when missing, start it on a fresh
profile, and drive it over the DevTools protocol (CDP) with a tiny websocket client.

No browser is downloaded: the binary is the distribution's. Chromium is kept off every
network but loopback (a dead loopback proxy for everything else, DNS of every other name
answered NOTFOUND, background services switched off), and stopped by its own PID.

    browser = Chromium(ensure_chromium(), profile_dir).start()
    page = browser.page()
    page.navigate("http://127.0.0.1:8000/")
    page.evaluate("document.title")
    page.screenshot(path, width=1280)
    browser.stop()
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import requests
import websocket

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
APT_TIMEOUT_S = 900

#: Besides the brief's flags: nothing may leave loopback. Non-loopback hosts go to a proxy on a
#: closed loopback port (Chromium always bypasses proxies for loopback) and resolve to nothing.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-breakpad",
    "--disable-client-side-phishing-detection",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication,InterestFeedContentSuggestions",
    "--metrics-recording-only",
    "--no-pings",
    "--mute-audio",
    "--hide-scrollbars",
    "--proxy-server=http://127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


class ChromiumUnavailable(RuntimeError):
    """No Chromium binary, and apt-get could not install one."""


def find_chromium() -> str | None:
    for name in CANDIDATES:
        if path := shutil.which(name):
            return path
    return None


def ensure_chromium() -> str:
    """The path of a Chromium binary, installing Debian's `chromium` with apt-get if needed."""
    if path := find_chromium():
        return path
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise ChromiumUnavailable("no chromium on PATH, and apt-get is not available to root here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ChromiumUnavailable(f"{' '.join(command)} took over {APT_TIMEOUT_S} s") from None
        if done.returncode != 0:
            raise ChromiumUnavailable(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    if path := find_chromium():
        return path
    raise ChromiumUnavailable("apt-get installed chromium, but no binary is on PATH")


class CDPError(RuntimeError):
    pass


class Page:
    """One tab, spoken to over its own websocket. Events are kept so tests can read them."""

    def __init__(self, ws_url: str, timeout: float) -> None:
        # Chromium refuses websocket clients that send an Origin it was not told to allow.
        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    def send(self, method: str, timeout: float | None = None, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        call_id = self._next_id
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        give_up = time.monotonic() + (timeout or self.timeout)
        while True:
            self.ws.settimeout(max(0.05, give_up - time.monotonic()))
            try:
                message = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                raise CDPError(f"{method}: no answer within {timeout or self.timeout} s") from None
            if message.get("id") == call_id:
                if "error" in message:
                    raise CDPError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str, timeout: float | None = None) -> Any:
        """The value of a JS expression; a Promise is awaited. A thrown error raises CDPError."""
        result = self.send(
            "Runtime.evaluate",
            timeout=timeout,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CDPError(f"JS error: {details.get('exception', {}).get('description') or details.get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, interval: float = 0.1) -> Any:
        """Poll a JS expression until it is truthy; its value, or CDPError after timeout."""
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(interval)
        raise CDPError(f"still falsy after {timeout} s: {expression}")

    def navigate(self, url: str, timeout: float = 15.0) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", timeout)

    def set_viewport(self, width: int, height: int, scale: float = 1.0, mobile: bool = False) -> None:
        self.send(
            "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=scale, mobile=mobile
        )

    def screenshot(self, path: Path, *, width: int, mobile: bool = False) -> Path:
        """A full-page PNG at this CSS width (the height is the page's)."""
        self.set_viewport(width, 800, mobile=mobile)
        height = int(self.evaluate("Math.ceil(document.documentElement.scrollHeight)"))
        self.set_viewport(width, max(height, 400), mobile=mobile)
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def event_names(self) -> list[str]:
        return [event["method"] for event in self.events]

    def close(self) -> None:
        self.ws.close()


class Chromium:
    """A headless Chromium process on its own profile directory; stopped by its PID."""

    def __init__(self, binary: str, profile: Path, *, timeout: float = 20.0) -> None:
        self.binary = binary
        self.profile = profile
        self.timeout = timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.pages: list[Page] = []

    def start(self) -> Chromium:
        self.profile.mkdir(parents=True, exist_ok=True)
        log = open(self.profile.parent / "chromium.log", "wb")  # noqa: SIM115 (the child writes to it)
        self.process = subprocess.Popen(
            [self.binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its renderers share our child's group, so stop() reaches them
        )
        log.close()
        port_file = self.profile / "DevToolsActivePort"
        give_up = time.monotonic() + self.timeout
        while time.monotonic() < give_up:
            if self.process.poll() is not None:
                raise ChromiumUnavailable(f"chromium exited with {self.process.returncode}: {self.log()}")
            if port_file.is_file() and (lines := port_file.read_text().split()):
                self.port = int(lines[0])
                return self
            time.sleep(0.05)
        self.stop()
        raise ChromiumUnavailable(f"chromium opened no DevTools port within {self.timeout} s: {self.log()}")

    def log(self) -> str:
        path = self.profile.parent / "chromium.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def page(self) -> Page:
        targets = requests.get(f"http://127.0.0.1:{self.port}/json/list", timeout=5).json()
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            pages = [requests.put(f"http://127.0.0.1:{self.port}/json/new?about:blank", timeout=5).json()]
        page = Page(pages[0]["webSocketDebuggerUrl"], self.timeout)
        self.pages.append(page)
        return page

    def stop(self) -> None:
        for page in self.pages:
            page.close()
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
