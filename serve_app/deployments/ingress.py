"""SpeechIngress: the OpenAI-compatible HTTP API (FastAPI), the only deployment that speaks HTTP.

The status code is decided before the first byte: the ingress awaits the encoder's first chunk and only then
commits to 200, so every failure before audio starts gets a proper OpenAI error body. A failure after
audio has started cannot change the status any more; it aborts a raw audio stream (the client sees a
broken chunked body, not a complete file) or ends an SSE stream with an error event.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import uuid
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    AuthenticationError, InvalidRequestError, NotFoundError, ServiceUnavailableError, as_api_error, error_body,
    status_of, to_error_response,
)
from ..ffmpeg import content_type
from ..logs import configure_logging
from ..observability import RequestRecord
from ..protocol import ModelCard, ModelList, SpeechRequest, Usage, VoiceList
from ..settings import Settings
from ..engine.generation import SynthesisRequest
from .encoder import EncodeRequest

logger = logging.getLogger("sesame_tts")


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's body: validation, routing (404/405) and anything unexpected."""

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        RequestRecord(new_request_id()).finish("400")
        return to_error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind, None, None), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception) -> JSONResponse:
        return to_error_response(exc)


def validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """Pydantic's first complaint about the body, as OpenAI's invalid_request_error."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return InvalidRequestError("We could not parse the JSON body of your request.", code="invalid_json")
    if kind == "model_attributes_type" or not loc:
        return InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    # loc[0] is the field; deeper parts (voice's union branches) do not matter to the client.
    param = loc[0]
    if kind == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    code = "invalid_type" if kind.endswith("_type") else "invalid_value"
    return InvalidRequestError(f"Invalid value for '{param}': {err.get('msg')}.", param=param, code=code)


def new_request_id() -> str:
    return uuid.uuid4().hex[:12]


class SpeechIngress:
    def __init__(self, settings: Settings, frontend, encoder, model):
        configure_logging(settings.log_level)
        self._settings = settings
        self._frontend = frontend
        self._encoder = encoder
        self._model = model
        self._in_flight = 0  # speech requests between arrival and their last byte

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this on the replica after __init__; routes are bound methods of this instance."""
        return self.build_asgi_app()

    def build_asgi_app(self) -> FastAPI:
        app = FastAPI(title="Sesame TTS", description="OpenAI-compatible text-to-speech with Sesame CSM-1B on MLX.")
        install_error_handlers(app)
        auth = [Depends(self.check_api_key)]
        app.add_api_route("/v1/audio/speech", self.create_speech, methods=["POST"], response_class=StreamingResponse,
                          dependencies=auth)
        app.add_api_route("/v1/models", self.list_models, methods=["GET"], response_model=ModelList, dependencies=auth)
        app.add_api_route("/v1/models/{model_id}", self.get_model, methods=["GET"], response_model=ModelCard,
                          dependencies=auth)
        app.add_api_route("/v1/audio/voices", self.list_voices, methods=["GET"], response_model=VoiceList,
                          dependencies=auth)
        app.add_api_route("/health", self.health, methods=["GET"])
        return app

    async def check_api_key(self, request: Request) -> None:
        """With API_KEY set, require `Authorization: Bearer <API_KEY>`; without it, accept any or none."""
        if self._settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        expected = self._settings.api_key.get_secret_value()
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
            RequestRecord(new_request_id()).finish("401")
            raise AuthenticationError("Incorrect or missing API key. Send 'Authorization: Bearer <API_KEY>'.")

    async def create_speech(self, body: SpeechRequest):
        """OpenAI createSpeech: streamed audio (chunked) or server-sent events."""
        if self._settings.drain_flag.exists():
            raise ServiceUnavailableError("The server is shutting down; retry shortly.", code="shutting_down")
        self._in_flight += 1
        record = RequestRecord(new_request_id(), characters=len(body.input), speed=float(body.speed),
                               on_finish=self._request_done)
        try:
            plan = await self._frontend.prepare.remote(body)
            record.voice = plan.preset.name
            record.fmt = body.response_format or self._settings.default_format
            synthesis = SynthesisRequest(plan.chunks, plan.preset, seed=body.seed, request_id=record.request_id)
            stream = self._encoder.options(stream=True).encode.remote(EncodeRequest(synthesis, record.fmt, record.speed))
            try:
                first = await stream.__anext__()
            except BaseException:
                stream.cancel()
                raise
        except BaseException as exc:
            record.finish("cancelled" if isinstance(exc, asyncio.CancelledError) else str(status_of(exc)))
            raise
        record.mark_first_byte()
        headers = {"Cache-Control": "no-cache"}
        if body.stream_format == "sse":
            return StreamingResponse(_sse_events(first, stream, record), media_type="text/event-stream", headers=headers)
        return StreamingResponse(_audio_bytes(first, stream, record), media_type=content_type(record.fmt), headers=headers)

    def _request_done(self) -> None:
        self._in_flight -= 1

    async def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard()])

    async def get_model(self, model_id: str) -> ModelCard:
        if model_id != ModelCard().id:
            raise NotFoundError(f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return ModelCard()

    async def list_voices(self) -> VoiceList:
        return VoiceList(voices=await self._frontend.voices.remote())

    async def health(self) -> JSONResponse:
        """200 when the model is loaded and ffmpeg runs; 503 with the reason otherwise."""
        model = await self._model.health.remote()
        encoder = await self._encoder.health.remote()
        voices = [v.id for v in await self._frontend.voices.remote()]
        draining = self._settings.drain_flag.exists()
        ok = model["status"] == "ready" and encoder["ok"] and not draining
        reasons = [r for r in (model.get("error"), None if encoder["ok"] else encoder["ffmpeg"]) if r]
        if model["status"] == "loading":
            reasons.append("model is loading")
        if draining:
            reasons.append("shutting down")
        body = {"status": "ok" if ok else ("draining" if draining else "unavailable"), "model": model,
                "ffmpeg": encoder["ffmpeg"], "voices": voices, "device": model["device"],
                "in_flight": self._in_flight}
        if reasons:
            body["reason"] = "; ".join(reasons)
        return JSONResponse(body, status_code=200 if ok else 503)


async def _items(first, stream, record: RequestRecord) -> AsyncIterator[bytes]:
    """The encoder's audio bytes (first included); its final `Usage` goes into the record."""
    item = first
    while True:
        if isinstance(item, Usage):
            record.usage = item
        else:
            yield item
        try:
            item = await stream.__anext__()
        except StopAsyncIteration:
            return


_CLIENT_GONE = (asyncio.CancelledError, GeneratorExit)  # how a disconnect reaches a response generator


def _ended(exc: BaseException) -> str:
    return "cancelled" if isinstance(exc, _CLIENT_GONE) else "aborted"


async def _audio_bytes(first, stream, record: RequestRecord) -> AsyncIterator[bytes]:
    """Raw audio. An error after the first byte propagates, so the server aborts the chunked body."""
    try:
        async for data in _items(first, stream, record):
            yield data
        record.finish("ok")
    except BaseException as exc:
        record.finish(_ended(exc))
        if not isinstance(exc, _CLIENT_GONE):
            logger.warning("request %s: audio stream aborted after it started: %s", record.request_id,
                           as_api_error(exc).message)
        raise
    finally:
        stream.cancel()


def _sse(event: dict) -> str:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n"


async def _sse_events(first, stream, record: RequestRecord) -> AsyncIterator[str]:
    """speech.audio.delta events, then speech.audio.done with usage, then [DONE]; an error event on failure."""
    try:
        async for data in _items(first, stream, record):
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
    finally:
        stream.cancel()
