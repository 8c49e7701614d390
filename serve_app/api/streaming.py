"""The body of a committed (200) speech response: raw audio bytes or server-sent events.

A failure after audio has started cannot change the status any more; it aborts a raw audio stream (the
client sees a broken chunked body, not a complete file) or ends an SSE stream with an error event.
Whatever way the response ends, the encoder stream is cancelled and the request's record finished, even
when the client left before Starlette started the body (it then never runs the body generator at all).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Optional

from fastapi.responses import StreamingResponse
from ray.exceptions import TaskCancelledError

from serve_app.api.limits import Lease
from serve_app.core.constants import LOGGER_NAME
from serve_app.core.errors import as_api_error
from serve_app.core.formats import FORMATS
from serve_app.core.messages import StageTimes, Usage, Utterance
from serve_app.core.observability import RequestRecord

logger = logging.getLogger(LOGGER_NAME)

# How a disconnect reaches a response generator.
CLIENT_GONE = (asyncio.CancelledError, GeneratorExit, TaskCancelledError)


def _ended(exc: BaseException) -> str:
    return "cancelled" if isinstance(exc, CLIENT_GONE) else "aborted"


def _sse(event: dict) -> str:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n"


class _ClosingResponse(StreamingResponse):
    """A StreamingResponse that calls `on_close` after it ends, however it ends."""

    def __init__(self, content, *, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except TaskCancelledError:
            # Serve's way of telling the replica that the client disconnected (raised from `receive`): the
            # response is over, nobody is left to answer, and it is no server error.
            pass
        finally:
            self._on_close()


class StartedSpeech:
    """One response's audio: the encoder's stream (its first item already received), the record, and the
    admission lease the response holds until it ends."""

    def __init__(
        self,
        first,
        stream,
        record: RequestRecord,
        lease: Lease,
        times: Optional[StageTimes] = None,
        on_said: Optional[Callable[[Utterance], Awaitable[None]]] = None,
    ):
        self._first = first
        self._stream = stream
        self._record = record
        self._lease = lease
        self._times = times
        self._on_said = on_said  # the utterance memory's remember

    def response(self, sse: bool, headers: dict, id_header: Optional[str] = None) -> StreamingResponse:
        """The committed response; `id_header`, if given, carries the request id under a dialect's own name
        (`x-request-id` is every response's already: api/request_ids.py)."""
        if id_header is not None:
            headers = {**headers, id_header: self._record.request_id}
        if self._times is not None and self._times.stages:
            headers = {**headers, "Server-Timing": self._times.header()}
        if sse:
            return _ClosingResponse(
                self._sse_events(), on_close=self.close, media_type="text/event-stream", headers=headers
            )
        return _ClosingResponse(
            self._audio_bytes(), on_close=self.close, media_type=FORMATS[self._record.fmt].content_type, headers=headers
        )

    def close(self) -> None:
        """Cancel the encoder stream, finish the record (a no-op if the body already finished it) and give
        the admission place back.

        The one place the stream is cancelled: `_ClosingResponse` calls this after every ending, so the
        body generators need no `finally` of their own."""
        self._record.finish("cancelled")
        self._lease.release()
        self._stream.cancel()

    async def _items(self) -> AsyncIterator[bytes]:
        """The encoder's audio bytes (first included); its final `Usage` goes into the record, and what was
        said into the utterance memory, before the body ends: a client that has read the whole body can name
        this response in its next request at once."""
        item = self._first
        while True:
            if isinstance(item, bytes):
                yield item
            elif isinstance(item, Usage):
                self._record.usage = item
            elif isinstance(item, Utterance) and self._on_said is not None:
                try:
                    await self._on_said(item)
                except Exception as exc:  # the audio is fine; only later context will miss this turn
                    logger.warning("request %s: not remembered: %s", self._record.request_id, exc)
            try:
                item = await self._stream.__anext__()
            except StopAsyncIteration:
                return

    def audio(self) -> AsyncIterator[bytes]:
        """The raw audio, for a listener of another protocol (which calls `close` after it, however it ends)."""
        return self._audio_bytes()

    async def _audio_bytes(self) -> AsyncIterator[bytes]:
        """Raw audio. An error after the first byte propagates, so the server aborts the chunked body."""
        record = self._record
        try:
            async for data in self._items():
                yield data
            record.finish("ok")
        except BaseException as exc:
            record.finish(_ended(exc))
            if not isinstance(exc, CLIENT_GONE):
                logger.warning(
                    "request %s: audio stream aborted after it started: %s",
                    record.request_id,
                    as_api_error(exc).message,
                )
            raise

    async def _sse_events(self) -> AsyncIterator[str]:
        """speech.audio.delta events, then speech.audio.done with usage, then [DONE]; an error event on failure."""
        record = self._record
        try:
            async for data in self._items():
                yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
            yield _sse({"type": "speech.audio.done", "usage": record.usage.as_openai()})
            yield "data: [DONE]\n\n"
            record.finish("ok")
        except Exception as exc:
            record.finish(_ended(exc))
            yield _sse({"type": "error", **as_api_error(exc).body()})
        except BaseException as exc:
            record.finish(_ended(exc))
            raise
