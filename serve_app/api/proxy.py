"""What runs of ours in Serve's HTTP proxy: the write deadline.

Serve applies the Starlette middlewares that `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` names
(`proxy_middlewares` below; the launcher sets it) around its own ASGI app, right on uvicorn. `WriteDeadline`
is that middleware:
- **Write deadline** (WRITE_TIMEOUT_S): a response the client stops reading ends; so does a WebSocket whose
  client stops reading (its messages queue in the proxy the same way), and the app hears that it closed.
  Its log line names the request by the response's `x-request-id` (Serve's own id, which the app adopts:
  api/request_ids.py).

The write deadline, why here: in Ray Serve 2.60 the ingress replica never sees the client's socket. Its
ASGI `send` appends to an unbounded queue, and the replica streams that queue to the proxy as a Ray
generator without backpressure (Serve sets no `_generator_backpressure_num_objects`). Only the proxy writes
to the socket, so a client that stops reading stalls only the proxy, and everything the model keeps
producing piles up in the proxy's memory. Before the deadline that was the whole response (tens of MB for a
long one as PCM), held for as long as the client kept the connection open. Freeing the model's slot at the
end of generation freed nothing there: one stalled connection after another pinned one response after
another.

The proxy is the one process that can tell: uvicorn's `send` waits while the connection's buffers are
full. While a send waits, the guard watches the bytes the client has not taken yet (the transport's buffer
plus the kernel's send queue): when they have not gone down for WRITE_TIMEOUT_S, the client has stopped
reading, and the response ends as if the client had left:
- the connection is reset, which drops what its buffers hold (a close would wait for them to drain);
- `receive` reports `http.disconnect`, so the proxy cancels the request along the whole chain (ingress,
  encoder, model), as it does for any client that disconnects;
- whatever the proxy still holds or receives for the response is dropped.

What one stopped reader can pin is therefore what its response produced until WRITE_TIMEOUT_S after the
client's last read, and only for that long. A reader that keeps taking bytes, however slowly the audio
plays, is never cut off: the kernel's queue shows every read, even when the send itself waits for minutes
(the kernel wakes a writer only once a large part of its send buffer, autotuned up to 4 MiB, is free again).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import struct
import sys
import termios
from typing import Optional

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.core.constants import LOGGER_NAME
from serve_app.core.logs import configure_logging
from serve_app.core.settings import Settings

logger = logging.getLogger(LOGGER_NAME)

# What the launcher sets so that Serve's proxy applies this guard (read once when the proxy starts).
PROXY_CALLBACK_VARIABLE = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "serve_app.api.proxy:proxy_middlewares"

_DISCONNECT: Message = {"type": "http.disconnect"}
_SO_NWRITE = 0x1024  # macOS <sys/socket.h>: bytes in the socket's send buffer (Python does not name it)
POLL_S = 0.25  # how often a waiting send looks at the connection's backlog, at the most


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy calls this once at start: the guard with WRITE_TIMEOUT_S from the settings (the
    environment and .env, which the launcher validated before it started Ray)."""
    settings = Settings.load()
    configure_logging(settings.log_level)
    return [Middleware(WriteDeadline, timeout_s=settings.write_timeout_s)]


class _Connection:
    """What the guard needs of the connection behind uvicorn's `send` (the server Serve's proxy runs): its
    request-response cycle keeps the asyncio transport. Anything else gets the plain deadline."""

    def __init__(self, send: Send):
        cycle = getattr(send, "__self__", None)
        self._flow = getattr(cycle, "flow", None)
        self.transport = getattr(cycle, "transport", None)
        get_extra_info = getattr(self.transport, "get_extra_info", None)
        self._socket = get_extra_info("socket") if callable(get_extra_info) else None

    def writable(self) -> bool:
        """Whether uvicorn's `send` will return at once (its transport is not paused on a full buffer)."""
        return getattr(self._flow, "write_paused", True) is False

    def backlog(self) -> Optional[int]:
        """Bytes written but not yet taken by the client: the transport's buffer plus the kernel's send
        queue (Linux: SIOCOUTQ; macOS: SO_NWRITE), or None where that cannot be read.

        Why the kernel's queue: a blocked `send` only returns once the kernel has room again, and the kernel
        wakes a writer only after a large part of its send buffer (autotuned up to 4 MiB) has gone. A player
        that reads opus in real time (4 KB/s) would make a `send` wait for minutes while taking bytes all
        along; the queue shrinking is what shows it is still reading."""
        if self._socket is None:
            return None
        try:
            pending = self.transport.get_write_buffer_size()
            if sys.platform == "darwin":
                return pending + self._socket.getsockopt(socket.SOL_SOCKET, _SO_NWRITE)
            if sys.platform.startswith("linux"):  # SIOCOUTQ is TIOCOUTQ's number
                queued = fcntl.ioctl(self._socket.fileno(), termios.TIOCOUTQ, b"\0" * 4)
                return pending + struct.unpack("i", queued)[0]
        except (AttributeError, OSError, ValueError):
            pass
        return None

    def abort(self) -> bool:
        """Reset the connection, dropping what its buffers hold. A close would not free them: asyncio's waits
        for its buffer to drain, and the kernel keeps sending its queue to a peer that takes nothing (an
        orphaned socket) unless the socket lingers 0 s, which makes the close a reset. True if aborted."""
        abort = getattr(self.transport, "abort", None)
        if not callable(abort):
            return False
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (AttributeError, OSError):
            pass
        abort()
        return True


class _Response:
    """One HTTP exchange under the guard: its `send` and `receive` as the wrapped app sees them."""

    def __init__(self, send: Send, receive: Receive, timeout_s: float, websocket: bool = False):
        self._send = send
        # A WebSocket's messages are its "body"; once it is dropped the app hears that the socket closed.
        self._body_type = "websocket.send" if websocket else "http.response.body"
        self._disconnect: Message = {"type": "websocket.disconnect", "code": 1006} if websocket else _DISCONNECT
        self._receive = receive
        self._timeout_s = timeout_s
        self._connection = _Connection(send)
        self._dropped = asyncio.Event()
        self._client_left = False  # its send failed: the client closed (`receive` brings its close)
        self._pending: Optional[asyncio.Future] = None  # the server's receive, kept across calls
        self.request_id = "-"
        self.sent = 0  # body bytes the connection has accepted

    async def send(self, message: Message) -> None:
        if self._dropped.is_set() or self._client_left:
            # The client is gone for the app: nothing more is written or kept. Still a suspension point, so an
            # app that sends in a loop lets its own `receive` (which now says so) run.
            await asyncio.sleep(0)
            return
        if message["type"] == "http.response.start":
            self.request_id = Headers(raw=message.get("headers", [])).get("x-request-id", "-")
        try:
            taken = await self._taken(message)
        except OSError:
            # uvicorn's ClientDisconnected: a WebSocket client closed while a message was on its way. What
            # comes after goes nowhere, as for a dropped response; `receive` still hands on the client's
            # own close. Raised into Serve's proxy instead, it closes the proxy's response generator, whose
            # error handler catches the GeneratorExit, logs it and yields again: two tracebacks per socket.
            self._client_left = True
            return
        if not taken:
            self._drop()
            return
        if message["type"] == self._body_type:
            self.sent += len(message.get("body", b"") or message.get("bytes", b"") or message.get("text", ""))

    async def _taken(self, message: Message) -> bool:
        """Send `message`; False if the client took no bytes for the whole deadline while it waited."""
        if self._connection.writable():  # the usual case: no task, no timer, no system call
            await self._send(message)
            return True
        sending = asyncio.ensure_future(self._send(message))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        backlog = self._connection.backlog()
        try:
            while True:
                wait = min(deadline - loop.time(), max(self._timeout_s / 8, POLL_S))
                if wait <= 0:
                    sending.cancel()
                    return False
                done, _ = await asyncio.wait({sending}, timeout=wait)
                if done:
                    sending.result()
                    return True
                now = self._connection.backlog()
                if now is not None and backlog is not None and now < backlog:
                    deadline = loop.time() + self._timeout_s  # the client took bytes: it is still reading
                backlog = now
        except asyncio.CancelledError:
            sending.cancel()
            raise

    def _drop(self) -> None:
        aborted = self._connection.abort()
        self._dropped.set()
        logger.warning(
            "request %s: the client took no response bytes for %.0f s (after %d bytes); %s, the rest of the "
            "response dropped (and its generation cancelled if it was still running)",
            self.request_id,
            self._timeout_s,
            self.sent,
            "connection reset" if aborted else "response ended",
        )

    async def receive(self) -> Message:
        """The server's messages; `http.disconnect` once the response is dropped, even while the server's
        own `receive` is still waiting (Serve's proxy waits on it to learn that a client left)."""
        if self._dropped.is_set():
            return self._disconnect
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._receive())
        dropped = asyncio.ensure_future(self._dropped.wait())
        try:
            await asyncio.wait({self._pending, dropped}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._pending.cancel()  # uvicorn's receive only waits on an event: nothing is lost
            self._pending = None
            raise
        finally:
            dropped.cancel()
        if self._pending.done():
            message, self._pending = self._pending.result(), None
            return message
        return self._disconnect


class WriteDeadline:
    """ASGI middleware (in Serve's proxy): the write deadline of `timeout_s` (see the module's docstring)."""

    def __init__(self, app: ASGIApp, timeout_s: float):
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        response = _Response(send, receive, self.timeout_s, websocket=scope["type"] == "websocket")
        if response.request_id == "-" and scope["type"] == "websocket":
            response.request_id = "websocket " + scope.get("path", "")[-80:]
        await self.app(scope, response.receive, response.send)
