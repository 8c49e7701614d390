"""The write deadline (api/proxy.py) on a real uvicorn server and real sockets, as Serve's proxy runs
it: a client that stops reading is cut off and the app behind it learns that the client left; a client that
reads slowly but steadily gets every byte. Both of uvicorn's HTTP
implementations (Serve's proxy takes whichever is installed). Through the real Serve proxy:
tests/e2e/test_security.py; one request id per response: tests/e2e/test_reliability.py."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from importlib.util import find_spec

import pytest
import uvicorn

from serve_app.api.proxy import PROXY_CALLBACK, WriteDeadline, proxy_middlewares
from serve_app.tools.local_server import free_port

CHUNK = 64 * 1024
IMPLEMENTATIONS = [
    "h11",
    pytest.param("httptools", marks=pytest.mark.skipif(find_spec("httptools") is None, reason="no httptools")),
]


class Streamer:
    """An ASGI app that streams `total` bytes (None: until the client leaves) as fast as the connection
    takes them, the way Serve's proxy does: it stops when `receive` says the client left (Serve's proxy then
    cancels the request upstream)."""

    def __init__(self, total: int | None):
        self.total = total
        self.produced = 0
        self.client_left = threading.Event()
        self.complete = False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        producer = asyncio.ensure_future(self._produce(send))
        listener = asyncio.ensure_future(self._listen(receive))
        await asyncio.wait({producer, listener}, return_when=asyncio.FIRST_COMPLETED)
        for task in (producer, listener):
            task.cancel()

    async def _listen(self, receive):
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.complete:  # uvicorn also says "disconnect" once a response is complete
            self.client_left.set()

    async def _produce(self, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"audio/pcm")]})
        while self.total is None or self.produced < self.total:
            body = b"\x01" * (CHUNK if self.total is None else min(CHUNK, self.total - self.produced))
            self.produced += len(body)
            more = self.total is None or self.produced < self.total
            self.complete = not more
            await send({"type": "http.response.body", "body": body, "more_body": more})


class Server:
    """uvicorn in a thread of its own, serving `app` on a free loopback port."""

    def __init__(self, app, http: str):
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, http=http, lifespan="off", log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    def connect(self, window: int = 16 * 1024) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
        sock.connect(("127.0.0.1", self.port))
        sock.sendall(f"GET /audio HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nConnection: close\r\n\r\n".encode())
        return sock


def _read_all(sock: socket.socket, pause_s: float = 0.0, size: int = 256 * 1024) -> tuple[bytes, bool]:
    """Everything until the server ends the connection; and whether it was reset (aborted)."""
    sock.settimeout(60)
    data = b""
    while True:
        try:
            chunk = sock.recv(size)
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, False
        data += chunk
        if pause_s:
            time.sleep(pause_s)


@pytest.mark.parametrize("http", IMPLEMENTATIONS)
def test_a_client_that_stops_reading_is_cut_off_and_the_app_learns_it_left(http):
    """An endless response, far more than the kernel's socket buffers hold; the client reads the headers
    and then nothing. The blocked send gives up after the deadline, the socket is aborted, and `receive`
    reports the disconnect (on which Serve's proxy cancels the request along the chain)."""
    app = Streamer(None)
    with Server(WriteDeadline(app, timeout_s=1.0), http) as server:
        sock = server.connect()
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
        assert app.client_left.wait(60), "the app never learnt that the client stopped reading"
        data, reset = _read_all(sock)
        sock.close()
    # Reset: the kernel dropped what it still held for the client (a close would have kept sending it).
    assert reset, len(data)


class Chatter:
    """A WebSocket app that keeps sending until `receive` brings the client's close (as a socket does whose
    audio is still on its way when the client leaves): what `send` raised, and the close it heard."""

    def __init__(self):
        self.send_errors: list[BaseException] = []
        self.close_code: int | None = None
        self.done = threading.Event()

    async def __call__(self, scope, receive, send):
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        talker = asyncio.ensure_future(self._talk(send))
        while (message := await receive())["type"] != "websocket.disconnect":
            pass
        self.close_code = message["code"]
        await asyncio.sleep(0.1)  # messages that were already on their way
        talker.cancel()
        self.done.set()

    async def _talk(self, send):
        while True:
            try:
                await send({"type": "websocket.send", "text": "x" * 1024})
            except Exception as exc:  # what Serve's proxy would have had to handle
                self.send_errors.append(exc)
            await asyncio.sleep(0.005)


def test_a_websocket_client_that_closes_while_messages_flow_ends_quietly():
    """A client closes while the app is still sending (LiveKit closes once it has its isFinal): the guard
    keeps uvicorn's ClientDisconnected from the app (in Serve's proxy it became a traceback per socket), and
    the app still hears the client's own close code."""
    from websockets.sync.client import connect

    app = Chatter()
    with Server(WriteDeadline(app, timeout_s=5.0), "h11") as server:
        with connect(f"ws://127.0.0.1:{server.port}/socket") as ws:
            ws.recv(timeout=30)
            ws.close(code=1001)
        assert app.done.wait(30), "the app never heard the client's close"
    assert app.send_errors == [] and app.close_code == 1001


@pytest.mark.slow("a client that reads slowly for seconds, by design")
def test_a_slow_but_steady_reader_gets_every_byte():
    """6 MiB read 64 KiB at a time with a pause after each (~0.6 MB/s). The kernel's send buffer fills, and
    a blocked send returns only once the kernel has freed a large part of it (about 2 MB here, 3 s at this
    pace, more than the deadline): the guard sees the client taking bytes in the kernel's queue and waits."""
    total = 6 * 1024 * 1024
    app = Streamer(total)
    with Server(WriteDeadline(app, timeout_s=2.0), "auto") as server:
        sock = server.connect(window=64 * 1024)
        data, reset = _read_all(sock, pause_s=0.1, size=64 * 1024)
        sock.close()
    assert not reset and not app.client_left.is_set()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body.endswith(b"0\r\n\r\n")
    assert body.count(b"\x01") == total


def test_serve_proxy_gets_the_guard_from_the_settings(monkeypatch, tmp_path):
    """What Serve's proxy calls (the launcher names it): one WriteDeadline with WRITE_TIMEOUT_S."""
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    monkeypatch.setenv("ENV_FILE", str(env_file))
    monkeypatch.setenv("WRITE_TIMEOUT_S", "7.5")
    (middleware,) = proxy_middlewares()
    assert middleware.cls is WriteDeadline and middleware.kwargs == {"timeout_s": 7.5}
    module, _, function = PROXY_CALLBACK.partition(":")
    assert getattr(__import__(module, fromlist=[function]), function) is proxy_middlewares


def test_the_launcher_has_serve_apply_the_guard_alone_and_in_a_cluster(capsys):
    from serve_app.launch import prepare_ray_environment

    for environ in ({"RAY_TMPDIR": "/tmp/x"}, {"RAY_ADDRESS": "192.168.1.20:6379", "RAY_AUTH_MODE": "token"}):
        prepare_ray_environment(environ)
        assert environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == PROXY_CALLBACK
    own = {"RAY_TMPDIR": "/tmp/x", "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "mine:middlewares"}
    prepare_ray_environment(own)
    assert own["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "mine:middlewares"  # the operator's choice stands
    assert "keeps its response in memory" in capsys.readouterr().err
