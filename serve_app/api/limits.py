"""The ingress's guards against overload and oversized bodies.

`Admission` bounds the speech requests inside the pipeline (the ones generating in the model's batch
plus the ones queued for it): a request beyond the bound gets 429 at once, before any audio, with a Retry-After that
estimates when a place frees up. An admitted request holds a `Lease` that its response releases when it ends,
however it ends. The ingress runs as one replica, so its count is the server's count.

`Gate` bounds a costly kind of request (custom-voice uploads: an ffmpeg decode each, and Mimi on the model's
only thread): a few at once, a few more waiting, 429 with Retry-After beyond.

`BodySizeLimit` is ASGI middleware: a declared Content-Length over the limit gets 413 without reading the
body; a chunked body is counted as it arrives and stopped at the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from typing import Optional

from fastapi import HTTPException
from starlette.responses import Response

from serve_app.api.errors import to_error_response
from serve_app.core.errors import APIError, PayloadTooLargeError, RateLimitError

_SMOOTHING = 0.2  # weight of the newest duration in the running average


class Lease:
    """One admitted speech request's place in the pipeline; whoever holds the response releases it, once."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._started = time.monotonic()
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._release(time.monotonic() - self._started)


class Admission:
    """Counts admitted speech requests; `admit` hands out a `Lease` or raises `RateLimitError` when the
    pipeline is full."""

    def __init__(self, max_queued: int, slots: int = 1):
        """`slots`: requests the model replicas generate at the same time (MAX_BATCH_SIZE each); the owner
        may change it as replicas come and go."""
        self.slots = slots
        self.max_queued = max_queued
        self.active = 0
        self._mean_s = 1.0  # running mean of admitted requests' durations (queueing included)

    @property
    def capacity(self) -> int:
        return self.slots + self.max_queued

    def admit(self) -> Lease:
        if self.active >= self.capacity:
            raise RateLimitError(
                f"The server is at capacity ({self.capacity} speech requests in progress or queued); "
                "retry after the time in the Retry-After header.",
                retry_after=self.retry_after(),
            )
        self.active += 1
        return Lease(self)

    def _release(self, duration_s: float) -> None:
        self.active -= 1
        self._mean_s += _SMOOTHING * (duration_s - self._mean_s)

    def retry_after(self) -> int:
        """Seconds until a place is likely free. With the pipeline full and served in order, a request's
        duration is about `capacity` service times, so one completion comes every mean/capacity."""
        return max(1, min(30, math.ceil(self._mean_s / self.capacity)))


class Gate:
    """At most `at_once` holders, at most `waiting` more in line; anyone beyond gets `RateLimitError`."""

    def __init__(self, at_once: int, waiting: int, what: str, retry_after: int = 5):
        self.at_once, self.waiting, self.what, self.retry_after = at_once, waiting, what, retry_after
        self.active = 0
        self._in_line = 0
        self._semaphore: Optional[asyncio.Semaphore] = None  # made on the serving event loop

    @contextlib.asynccontextmanager
    async def enter(self):
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.at_once)
        if self.active >= self.at_once and self._in_line >= self.waiting:
            raise RateLimitError(
                f"Too many {self.what}s at once ({self.at_once} in progress, {self.waiting} "
                "waiting); retry after the time in the Retry-After header.",
                retry_after=self.retry_after,
            )
        self._in_line += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._in_line -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._semaphore.release()


class BodyTooLarge(HTTPException):
    """Raised from the counting `receive`; FastAPI passes HTTPExceptions through body parsing untouched."""

    def __init__(self, limit: int):
        super().__init__(status_code=413, detail=too_large_message(limit))


def too_large_message(limit: int) -> str:
    return f"The request body is larger than this server accepts ({limit} bytes)."


class BodySizeLimit:
    """ASGI middleware enforcing `max_bytes` on HTTP request bodies."""

    def __init__(
        self,
        app,
        max_bytes: int,
        larger: Optional[dict[str, int]] = None,
        respond: Optional[Callable[[str, APIError], Optional[Response]]] = None,
    ):
        """`larger`: paths whose POST bodies may be bigger (uploads), with their own limit. `respond`: the
        413 in another dialect's shape for a path (None: OpenAI's)."""
        self.app = app
        self.max_bytes = max_bytes
        self.larger = larger or {}
        self.respond = respond or (lambda path, error: None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = (
            self.larger.get(scope.get("path", ""), self.max_bytes) if scope.get("method") == "POST" else self.max_bytes
        )
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        # A malformed Content-Length is the HTTP server's to reject; only a real number is judged here.
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            error = PayloadTooLargeError(too_large_message(limit))
            response = self.respond(scope.get("path", ""), error) or to_error_response(error)
            return await response(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counting_receive, send)
