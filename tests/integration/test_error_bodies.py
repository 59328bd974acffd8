"""Error bodies carry fixed reasons: nothing an upstream sent, no exception text, and the same
bytes for ports that fail the same way (a closed port and an SSH banner; a port that never
answers and one that accepts and stays silent). Loopback listeners only, allowed through
ALLOW_NETWORKS like the test upstream."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from app import create_app
from app.settings import Settings
from tests.upstream import Blackhole

BANNER = b"SSH-2.0-OpenSSH_9.6\r\n"


class Listener:
    """127.0.0.1:<free port>: each connection gets `greeting` (nothing if empty), then the
    connection is held until the client hangs up or `hold` seconds pass."""

    def __init__(self, greeting: bytes, hold: float = 5.0) -> None:
        self.greeting, self.hold = greeting, hold
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            if self.greeting:
                conn.sendall(self.greeting)
            conn.settimeout(self.hold)
            while conn.recv(4096):  # read the request until the client hangs up
                pass

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self.thread.join(timeout=2)


@pytest.fixture
def listeners() -> Iterator[list]:
    made: list = []
    yield made
    for item in made:
        item.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def fetch_through(client, port: int, path: str = "photo.jpg"):
    return client.get(f"/image?url={quote(f'http://127.0.0.1:{port}/{path}', safe='')}&w=64")


def test_a_banner_listener_and_a_closed_port_give_byte_identical_bodies(client, listeners):
    banner = Listener(BANNER)
    listeners.append(banner)
    talked, refused = fetch_through(client, banner.port), fetch_through(client, closed_port())
    assert banner.accepted >= 1, "the fetch really reached the banner listener"
    assert (talked.status_code, refused.status_code) == (502, 502)
    assert talked.get_data() == refused.get_data()
    assert talked.json == {"error": "cannot connect to the upstream, or it did not answer with HTTP"}
    assert b"SSH" not in talked.get_data() and str(banner.port).encode() not in talked.get_data()


def test_garbage_and_a_hang_up_read_like_a_closed_port(client, listeners):
    bodies = set()
    for greeting in (b"\x00\xff\xfe garbage\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n", b"220 smtp.internal ESMTP\r\n"):
        listener = Listener(greeting, hold=0.0)
        listeners.append(listener)
        response = fetch_through(client, listener.port)
        assert response.status_code == 502
        bodies.add(response.get_data())
    bodies.add(fetch_through(client, closed_port()).get_data())
    assert len(bodies) == 1, bodies


@pytest.fixture
def quick_timeout_client(settings: Settings):
    app = create_app(settings.replace(upstream_timeout=1.0))
    yield app.test_client()
    app.extensions["image_proxy"].fetcher.close()


def test_a_port_that_never_answers_and_one_that_stays_silent_give_byte_identical_bodies(
    quick_timeout_client, listeners
):
    silent = Listener(b"")
    hole = Blackhole("127.0.0.1")
    listeners += [silent, hole]
    quiet, dropped = fetch_through(quick_timeout_client, silent.port), fetch_through(quick_timeout_client, hole.port)
    assert silent.accepted >= 1
    assert (quiet.status_code, dropped.status_code) == (504, 504)
    assert quiet.get_data() == dropped.get_data()
    assert quiet.json == {"error": "upstream did not deliver the image within 1 s"}


def test_a_redirect_to_a_refused_url_does_not_echo_the_location(client, upstream):
    for target in ("gopher://internal.example:70/<script>SSH-2.0", "http://user:secret@10.1.2.3/",
                   "http://127.0.0.1:99999/x"):
        response = client.get(f"/image?url={quote(upstream.url('to?url=' + quote(target, safe='')), safe='')}")
        assert response.status_code == 400, response.json
        assert response.json == {"error": "the upstream redirected to a refused URL"}


def test_a_corrupt_image_gets_a_fixed_reason_without_the_decoders_text(client, upstream):
    response = client.get(f"/image?url={quote(upstream.url('edge/truncated.jpg'), safe='')}&w=64")
    assert response.status_code == 400
    # Pillow says "image file is truncated (1 bytes not processed)": that stays in the log.
    assert response.json == {"error": "the JPEG data is corrupt or truncated"}


@pytest.mark.parametrize("length", [b"\xb2", b"\xd9\xa3", b" 12", b"-1", b"1e3"],
                         ids=["superscript-two", "arabic-indic-digit", "space", "negative", "exponent"])
def test_an_odd_content_length_is_an_answer_not_a_500(client, listeners, length):
    # str.isdigit() accepts "²", which int() refuses: that was a 500 (ValueError) before.
    listener = Listener(b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\nConnection: close\r\n\r\nabc", hold=0.0)
    listeners.append(listener)
    response = fetch_through(client, listener.port)
    assert response.status_code in (400, 502), response.get_data()
    assert set(response.json) == {"error"}
