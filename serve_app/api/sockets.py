"""ElevenLabs' text-streaming WebSockets, for voice agents (Pipecat, LiveKit, the elevenlabs SDK).

- `/elevenlabs/v1/text-to-speech/{voice_id}/stream-input`: one context. Its first message (`text: " "`,
  `voice_settings`, `generation_config`) starts it, text follows (`flush` speaks what is buffered;
  `try_trigger_generation` is accepted), `text: ""` ends it: the rest is spoken, then `isFinal`, then the
  socket closes.
- `/multi-stream-input`: up to MAX_CONTEXTS contexts at once, each created by its first message with a new
  `context_id`: text, `flush`, `close_context`, `close_socket`, and keepalives (`text: ""`, which end nothing
  here). Every message the server sends on it names its context as `contextId` and `context_id` (Pipecat
  reads one, LiveKit the other); `isFinal` follows a closed context once it has drained.

A context is an api/contexts.SpeechContext: every piece of it goes through the ingress's `start_speech`,
so admission (busy: ElevenLabs' error, then the socket closes), voices, limits and guards are HTTP's; the
context has one request log line, `protocol=websocket`. The guard (api/screen.py) checked the handshake's
Host and Origin (a web page of a foreign origin cannot open these sockets) and the key, which ElevenLabs also
takes in the first message (`xi_api_key`, `xi-api-key`, `authorization`). Messages are bounded in size and
rate of pieces; the proxy's write deadline (api/proxy.py) cuts off a client that stops reading.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
from typing import Any, Optional

from starlette.websockets import WebSocket, WebSocketDisconnect

from serve_app.api.contexts import SpeechContext
from serve_app.audio.ffmpeg import find_ffmpeg
from serve_app.core.constants import LOGGER_NAME
from serve_app.core.errors import APIError, RateLimitError, as_api_error, value_of
from serve_app.core.formats import ELEVENLABS_FORMATS
from serve_app.core.settings import Settings

logger = logging.getLogger(LOGGER_NAME)

PROTOCOL = "websocket"
MAX_CONTEXTS = 5  # ElevenLabs' limit per socket
DEFAULT_INACTIVITY_S, MAX_INACTIVITY_S = 20, 180  # ElevenLabs' default and maximum `inactivity_timeout`
MAX_CONTEXT_ID = 128
SCHEDULE_RANGE = (50, 500)
SPEED_RANGE = (0.25, 4.0)  # as on HTTP  # ElevenLabs' bounds for a chunk_length_schedule entry
KEY_FIELDS = ("xi_api_key", "xi-api-key", "authorization")
POLICY, TOO_BIG, SERVER_ERROR, TRY_LATER = 1008, 1009, 1011, 1013  # WebSocket close codes


class SocketError(Exception):
    """A refusal: ElevenLabs' error message, then the socket closes with `close_code`."""

    def __init__(self, message: str, error: str, close_code: int = POLICY, status: int = 400):
        super().__init__(message)
        self.error, self.close_code, self.status = error, close_code, status


def _close_code(error: APIError) -> int:
    if isinstance(error, RateLimitError) or error.status_code == 503:
        return TRY_LATER
    return SERVER_ERROR if error.status_code >= 500 else POLICY


def _flag(value: Optional[str]) -> bool:
    return (value or "").lower() in ("true", "1", "yes")


class _Options:
    """The query's options (ElevenLabs' other fields, model_id among them, are accepted and unused)."""

    def __init__(self, query):
        self.fmt = query.get("output_format") or "mp3_44100_128"
        if self.fmt not in ELEVENLABS_FORMATS:
            raise SocketError(f"output_format '{self.fmt[:40]}' is not supported.", "invalid_output_format")
        self.auto_mode = _flag(query.get("auto_mode"))
        try:
            self.inactivity_s = int(query.get("inactivity_timeout") or DEFAULT_INACTIVITY_S)
        except ValueError:
            raise SocketError("inactivity_timeout is not a number of seconds.", "invalid_request") from None
        if not 1 <= self.inactivity_s <= MAX_INACTIVITY_S:
            raise SocketError(f"inactivity_timeout must be 1 to {MAX_INACTIVITY_S} s.", "invalid_request")


class _Socket:
    """One connection: reads messages, runs its contexts, sends their audio in order per context."""

    def __init__(self, sockets: ElevenLabsSockets, ws: WebSocket, voice: str, options: _Options, multi: bool):
        self.sockets, self.ws, self.voice, self.options, self.multi = sockets, ws, voice, options, multi
        self.contexts: dict[str, SpeechContext] = {}
        self.watchers: set[asyncio.Task] = set()
        self.ended: asyncio.Future = asyncio.get_running_loop().create_future()  # (close code, reason)
        self._lock = asyncio.Lock()

    async def send(self, message: dict) -> None:
        async with self._lock:
            await self.ws.send_text(json.dumps(message, separators=(",", ":")))

    def _tagged(self, context_id: str, message: dict) -> dict:
        return {**message, "contextId": context_id, "context_id": context_id} if self.multi else message

    def _emitter(self, context_id: str):
        async def emit(kind: str, payload: Any) -> None:
            if kind == "audio":
                message = {"audio": base64.b64encode(payload).decode(), "alignment": None, "normalizedAlignment": None}
            else:
                given, spoken = payload
                message = {"audio": None, "alignment": given.websocket(), "normalizedAlignment": spoken.websocket()}
            if not self.multi:
                message["isFinal"] = None
            await self.send(self._tagged(context_id, message))

        return emit

    def _open(self, context_id: str, message: dict) -> SpeechContext:
        if len([c for c in self.contexts.values() if c.open]) >= MAX_CONTEXTS:
            raise SocketError(
                f"At most {MAX_CONTEXTS} contexts may be open on one socket; close one first.",
                "max_active_conversations",
            )
        speed, schedule = _speed(message), _schedule(message)
        context = SpeechContext(
            self.sockets.start_speech,
            self.sockets.settings,
            self.sockets.ffmpeg,
            voice=self.voice,
            fmt=self.options.fmt,
            speed=speed,
            protocol=PROTOCOL,
            emit=self._emitter(context_id),
            custom_voices=self.sockets.custom_voices(self.ws),
            auto_mode=self.options.auto_mode,
            schedule=schedule,
        )
        self.contexts[context_id] = context
        watcher = asyncio.create_task(self._watch(context_id, context))
        self.watchers.add(watcher)
        watcher.add_done_callback(self.watchers.discard)
        return context

    async def _watch(self, context_id: str, context: SpeechContext) -> None:
        """`isFinal` once the context has drained (or was cut short by a barge-in); its error otherwise,
        which ends the socket."""
        await asyncio.wait({context.task})
        if self.contexts.get(context_id) is context:
            del self.contexts[context_id]
        if not context.task.cancelled() and (exc := context.task.exception()) is not None:
            error = as_api_error(exc)
            self.end(_close_code(error), error.message, context_id, error)
            return
        if self.ended.done() and self.ended.result()[3] is not None:
            return  # the socket ends on an error: that is the last message
        try:
            await self.send(self._tagged(context_id, {"isFinal": True}))
        except Exception:  # the client has gone: nobody is left to tell
            return
        if not self.multi:
            self.end(1000, "done")

    def end(self, code: int, reason: str, context_id: Optional[str] = None, error=None) -> None:
        if not self.ended.done():
            self.ended.set_result((code, reason, context_id, error))

    def handle(self, message: dict) -> None:
        if self.multi:
            self._handle_multi(message)
        else:
            self._handle_single(message)

    def _handle_single(self, message: dict) -> None:
        context = self.contexts.get("")
        text = _text(message)
        if context is None:
            if self.watchers:  # it has ended: whatever comes now is late
                return
            context = self._open("", message)
            if text.strip():
                context.add_text(text)
            return
        if text == "" and "text" in message:  # EOS: speak the rest, then isFinal and close
            context.flush()
            context.close()
            return
        context.add_text(text)
        if message.get("flush") is True:
            context.flush()

    def _handle_multi(self, message: dict) -> None:
        if message.get("close_socket") is True:
            for context in self.contexts.values():
                context.close()
            self.end(1000, "close_socket")
            return
        context_id = message.get("context_id")
        if context_id is None:
            return  # a keepalive for the socket
        if not isinstance(context_id, str) or not context_id or len(context_id) > MAX_CONTEXT_ID:
            raise SocketError(f"context_id must be text of 1 to {MAX_CONTEXT_ID} characters.", "invalid_request")
        text = _text(message)
        context = self.contexts.get(context_id)
        if context is None:
            if message.get("close_context") is True or not text and "voice_settings" not in message:
                return  # a keepalive, or the close of a context already gone
            context = self._open(context_id, message)
        if text.strip():
            context.add_text(text)
        if message.get("flush") is True:
            context.flush()
        if message.get("close_context") is True:
            context.close()

    def speaking(self) -> bool:
        """Whether a context has text to speak (the inactivity timeout waits for it)."""
        return any(not c.idle for c in self.contexts.values())

    def cancel_all(self) -> None:
        for context in self.contexts.values():
            context.cancel()


def _text(message: dict) -> str:
    text = message.get("text", "")
    if not isinstance(text, str):
        raise SocketError("text must be a string.", "invalid_request")
    return text


def _speed(message: dict) -> float:
    """The speed of a context's voice_settings (1.0 without), in HTTP's range; the other settings have no CSM
    counterpart and are accepted."""
    raw = message.get("voice_settings") or {}
    speed = raw.get("speed") if isinstance(raw, dict) else None
    if speed is None:
        return 1.0
    if type(speed) not in (int, float) or not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
        raise SocketError(f"voice_settings.speed must be {SPEED_RANGE[0]} to {SPEED_RANGE[1]}.", "invalid_request")
    return float(speed)


def _schedule(message: dict) -> list[int]:
    config = message.get("generation_config") or {}
    schedule = config.get("chunk_length_schedule") if isinstance(config, dict) else None
    if schedule is None:
        return []
    low, high = SCHEDULE_RANGE
    if not isinstance(schedule, list) or not all(type(n) is int and low <= n <= high for n in schedule):
        raise SocketError(f"chunk_length_schedule must be a list of {low} to {high}.", "invalid_request")
    return schedule


class ElevenLabsSockets:
    """The two WebSocket routes of the ElevenLabs dialect, bound to the ingress's `start_speech`."""

    def __init__(self, settings: Settings, frontend, start_speech, voice_name):
        self.settings, self.start_speech = settings, start_speech
        self._frontend, self._voice_name = frontend, voice_name
        self.ffmpeg = find_ffmpeg(settings.ffmpeg_path)[0]

    def add_to(self, app) -> None:
        app.add_api_websocket_route("/v1/text-to-speech/{voice_id}/stream-input", self.stream_input)
        app.add_api_websocket_route("/v1/text-to-speech/{voice_id}/multi-stream-input", self.multi_stream_input)

    async def stream_input(self, websocket: WebSocket, voice_id: str) -> None:
        await self._serve(websocket, voice_id, multi=False)

    async def multi_stream_input(self, websocket: WebSocket, voice_id: str) -> None:
        await self._serve(websocket, voice_id, multi=True)

    def custom_voices(self, ws: WebSocket) -> bool:
        return bool(ws.scope.get("state", {}).get("api_key_ok"))

    def _key_ok(self, message: dict) -> bool:
        expected = self.settings.api_key
        for name in KEY_FIELDS:
            given = message.get(name)
            if isinstance(given, str) and given:
                given = given.removeprefix("Bearer ").strip()
                return hmac.compare_digest(given.encode(), expected.get_secret_value().encode())
        return False

    async def _serve(self, ws: WebSocket, voice_id: str, multi: bool) -> None:
        await ws.accept()
        socket: Optional[_Socket] = None
        code, reason = 1000, "done"
        try:
            options = _Options(ws.query_params)
            first = await self._receive(ws, options.inactivity_s)
            if first is None:
                return
            if not self.custom_voices(ws):  # the key was not in the headers: ElevenLabs takes it here too
                if not self._key_ok(first):
                    raise SocketError("Invalid API key: send it as 'xi-api-key'.", "invalid_api_key", status=401)
                ws.scope.setdefault("state", {})["api_key_ok"] = True
            voice = await self._voice_name(voice_id)
            await value_of(self._frontend.check_voice.remote(voice, self.custom_voices(ws)))
            socket = _Socket(self, ws, voice, options, multi)
            socket.handle(first)
            code, reason = await self._loop(socket, options)
        except SocketError as exc:
            code, reason = exc.close_code, str(exc)
            await self._error(ws, str(exc), exc.error, exc.status)
        except APIError as exc:
            code, reason = _close_code(exc), exc.message
            await self._error(ws, exc.message, exc.code or exc.type, exc.status_code)
        except (WebSocketDisconnect, OSError):
            code, reason = 1001, "left"
        finally:
            if socket is not None:
                socket.cancel_all()
                await asyncio.gather(*socket.watchers, return_exceptions=True)
            try:
                await ws.close(code)
            except (RuntimeError, OSError):
                pass
            logger.info("websocket: %s closed (%d: %s)", ws.url.path.rsplit("/", 1)[-1], code, reason[:200])

    async def _loop(self, socket: _Socket, options: _Options) -> tuple[int, str]:
        receiving: Optional[asyncio.Future] = None
        try:
            while not socket.ended.done():
                receiving = receiving or asyncio.ensure_future(self._receive(socket.ws, None))
                done, _ = await asyncio.wait(
                    {receiving, socket.ended}, timeout=options.inactivity_s, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    if socket.speaking():
                        continue
                    raise SocketError(
                        f"No text arrived for {options.inactivity_s} s (inactivity_timeout).",
                        "input_timeout_exceeded",
                    )
                if receiving in done:
                    message, receiving = receiving.result(), None
                    if message is None:
                        return 1001, "left"
                    socket.handle(message)
            code, reason, context_id, error = socket.ended.result()
            if error is not None:
                await self._error(socket.ws, error.message, error.code or error.type, error.status_code, context_id)
            elif code == 1000:  # close_socket: the flushed audio first
                await asyncio.gather(*socket.watchers, return_exceptions=True)
            return code, reason
        finally:
            if receiving is not None:
                receiving.cancel()

    async def _receive(self, ws: WebSocket, timeout: Optional[float]) -> Optional[dict]:
        """The next message as a JSON object, or None once the client has gone."""
        try:
            message = await asyncio.wait_for(ws.receive(), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            message = f"No message arrived for {timeout:g} s (inactivity_timeout)."
            raise SocketError(message, "input_timeout_exceeded") from None
        if message["type"] == "websocket.disconnect":
            return None
        raw = message.get("text")
        if raw is None:
            raise SocketError("Messages must be JSON text.", "invalid_request")
        if len(raw) > 4 * self.settings.max_input_length + 4096:
            raise SocketError("The message is too large.", "message_too_large", TOO_BIG)
        try:
            data = json.loads(raw)
        except ValueError:
            raise SocketError("The message is not JSON.", "invalid_request") from None
        if not isinstance(data, dict):
            raise SocketError("The message is not a JSON object.", "invalid_request")
        if len(_text(data)) > self.settings.max_input_length:
            raise SocketError(f"text is longer than {self.settings.max_input_length} characters.", "invalid_request")
        return data

    @staticmethod
    async def _error(ws: WebSocket, message: str, error: str, status: int, context_id: Optional[str] = None) -> None:
        body: dict[str, Any] = {"message": message, "error": error, "code": status}
        if context_id is not None:
            body.update(contextId=context_id, context_id=context_id)
        try:
            await ws.send_text(json.dumps(body))
        except (RuntimeError, OSError, WebSocketDisconnect):
            pass
