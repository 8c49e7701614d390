"""SpeechIngress: the OpenAI-compatible HTTP API (FastAPI), the only deployment that speaks HTTP.

The status code is decided before the first byte: the ingress awaits the encoder's first chunk and only then
commits to 200, so every failure before audio starts gets a proper OpenAI error body. A failure after
audio has started cannot change the status any more; it aborts a raw audio stream (the client sees a
broken chunked body, not a complete file) or ends an SSE stream with an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse

from serve_app.api import discovery, elevenlabs
from serve_app.api.errors import create_error_response, install_error_handlers
from serve_app.api.health import judge
from serve_app.api.limits import Admission, BodySizeLimit
from serve_app.api.protocol import AudioModel, AudioModelList, ModelCard, ModelList, SpeechRequest, VoiceList
from serve_app.api.request_ids import RequestIds, request_id_of
from serve_app.api.routing import Route, add_routes
from serve_app.api.screen import RequestScreen
from serve_app.api.streaming import CLIENT_GONE, StartedSpeech
from serve_app.api.voice_routes import UPLOAD_BODY_BYTES, UPLOAD_PATHS, VoiceRoutes
from serve_app.api.wyoming import WyomingListener
from serve_app.core.constants import LOGGER_NAME
from serve_app.core.errors import APIError, NotFoundError, ServiceUnavailableError, status_of, value_of
from serve_app.core.formats import OPENAI_FORMATS
from serve_app.core.health import ReplicaHealth
from serve_app.core.logs import configure_logging
from serve_app.core.messages import EncodeRequest, SpeechInput, StageTimes, SynthesisRequest
from serve_app.core.observability import RequestRecord
from serve_app.core.settings import Settings
from serve_app.model import registry as replicas

logger = logging.getLogger(LOGGER_NAME)


# One server-sent event: `data` is a JSON speech.audio.delta / speech.audio.done / error event, or [DONE].
SSE_EVENT_SCHEMA = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}

SPEECH_RESPONSES = {
    200: {
        "description": "Audio as it is generated (chunked), or server-sent events when stream_format is 'sse'.",
        "content": {
            **{
                ctype: {"schema": {"type": "string", "format": "binary"}}
                for ctype in {f.content_type for f in OPENAI_FORMATS.values()}
            },
            "text/event-stream": {"schema": SSE_EVENT_SCHEMA},
        },
    },
}


def _openapi_without_422(app: FastAPI) -> dict:
    """FastAPI documents 422 for validation errors; this server answers them with 400 (as OpenAI does)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


SPEECH_PATH = "/v1/audio/speech"

# Who may call what, decided on the headers by RequestScreen: (method, path pattern, access). "lists": open
# unless LISTS_NEED_API_KEY (Open WebUI fetches them without a key; custom voices are listed only with the
# key); "trusted": the key or a loopback client (details of this machine); "write": the key, or without
# API_KEY a loopback client (what the server stores: voices and consents); anything else under /v1/ and
# /elevenlabs/ needs the key; other paths are open (they are 404s).
ROUTE_ACCESS = [
    ("POST", re.compile(r"/v1/audio/(voices|voice_consents)(/[^/]+)?"), "write"),
    ("DELETE", re.compile(r"/v1/audio/(voices|voice_consents)/[^/]+"), "write"),
    ("GET", re.compile(r"/health"), None),
    ("GET", re.compile(r"/(docs|docs/oauth2-redirect|redoc|openapi\.json)"), "trusted"),
    ("GET", re.compile(r"/v1/models(/[^/]+)?|/v1/audio/models|/v1/audio/voices"), "lists"),
    ("GET", re.compile(r"/elevenlabs/v1/voices(/[^/]+)?|/elevenlabs/v2/voices|/elevenlabs/v1/models"), "lists"),
]
GUARDED_PREFIXES = ("/v1/", elevenlabs.PREFIX + "/")


def route_access(settings: Settings, method: str, path: str) -> Optional[str]:
    if method == "OPTIONS":  # a browser's CORS preflight never carries the key (CORSMiddleware answers it)
        return None
    for route_method, pattern, access in ROUTE_ACCESS:
        if (method == route_method or method == "HEAD" and route_method == "GET") and pattern.fullmatch(path):
            return ("key" if settings.lists_need_api_key else None) if access == "lists" else access
    return "key" if path.startswith(GUARDED_PREFIXES) else None


async def _first_audio(stream) -> tuple[bytes, StageTimes]:
    """The encoder's first audio and where its time went (the encoder sends a StageTimes just before it);
    the stream is cancelled if it fails or the client leaves before then."""
    try:
        first = await stream.__anext__()
        times = StageTimes()
        if isinstance(first, StageTimes):
            times, first = first, await stream.__anext__()
        return first, times
    except BaseException:
        stream.cancel()
        raise


def _stages(times: StageTimes, started: float, admitted: float, planned: float, now: float) -> dict[str, float]:
    """The first audio's stages in ms: the ingress's own (admit, plan, the hops between deployments, the
    total) around the encoder's view (the model's time and ffmpeg's)."""
    encoder_ms = sum(times.stages.values())
    return {
        "admit": 1000 * (admitted - started),
        "plan": 1000 * (planned - admitted),
        **times.stages,
        **({"hops": 1000 * (now - planned) - encoder_ms} if encoder_ms else {}),
        "total": 1000 * (now - started),
    }


class SpeechIngress:
    def __init__(
        self, settings: Settings, frontend, encoder, model, model_replicas: int = 1, health_key: str = "local"
    ):
        configure_logging(settings.log_level)
        settings = settings.with_secrets()  # API_KEY from SECRETS_FILE: never in what Ray shipped
        self._settings = settings
        self._frontend = frontend
        self._encoder = encoder
        self._model = model
        self._model_replicas = model_replicas
        self._health_key = health_key
        # Speech requests between admission and their last byte; bounded, and the stop drain waits for it. The
        # slots follow the model replicas that can serve (refreshed from their published health).
        self._admission = Admission(settings.max_queued_requests, slots=model_replicas * settings.max_batch_size)
        self._replicas: list[ReplicaHealth] = []
        self._replicas_read = 0.0
        self._wyoming: Optional[WyomingListener] = None
        if settings.wyoming_port:  # Home Assistant's protocol, over the same start_speech (api/wyoming.py)
            host = discovery.wyoming_host(settings)
            self._wyoming = WyomingListener(settings, host, self.start_speech, frontend)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this on the replica after __init__; routes are bound methods of this instance."""
        return self.build_asgi_app()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI):
        """The other listeners live as long as the app: Serve runs this at the replica's start and stop."""
        listener = self._wyoming
        announcement = None
        if listener is not None and await listener.start():
            address = discovery.lan_address(listener.host) if self._settings.wyoming_zeroconf else None
            if address is not None:
                announcement = discovery.Announcement(discovery.service_info(address, self._settings.wyoming_port))
                await announcement.start()
        try:
            yield
        finally:
            if announcement is not None:
                await announcement.stop()
            if listener is not None:
                await listener.stop()

    def build_asgi_app(self) -> FastAPI:
        app = FastAPI(
            title="Sesame TTS",
            description="OpenAI-compatible text-to-speech with Sesame CSM-1B on MLX.",
            lifespan=self._lifespan,
        )
        install_error_handlers(
            app, "openai", on_bad_request=lambda request: RequestRecord(request_id_of(request.scope)).finish("400")
        )
        app.add_middleware(
            BodySizeLimit,
            max_bytes=self._settings.max_request_bytes,
            larger=dict.fromkeys(UPLOAD_PATHS, UPLOAD_BODY_BYTES),
            respond=self._dialect_error,
        )
        if self._settings.cors_origins:  # browser pages allowed to call (and read) the API
            app.add_middleware(
                CORSMiddleware,
                allow_origins=list(self._settings.cors_origins),
                allow_methods=["*"],
                allow_headers=["*"],
                expose_headers=["x-request-id", "request-id", "server-timing"],
            )
        # Outermost: Host, Origin, API key and the body's deadline, on the headers, before any body is read.
        app.add_middleware(
            RequestScreen,
            settings=self._settings,
            access=lambda method, path: route_access(self._settings, method, path),
            respond=self._dialect_error,
            on_unauthorized=self._unauthorized,
            alternative_key_header=lambda path: "xi-api-key" if path.startswith(elevenlabs.PREFIX) else None,
        )
        # Outside even the guard, so a refusal carries the request's id too.
        app.add_middleware(RequestIds, respond=self._dialect_error)
        add_routes(app, self.routes())
        # ElevenLabs' API under its own prefix (its routes clash with OpenAI's; its errors have another shape).
        app.mount(
            elevenlabs.PREFIX, elevenlabs.ElevenLabsRoutes(self._settings, self._frontend, self.start_speech).app()
        )
        app.openapi = lambda: _openapi_without_422(app)
        return app

    def routes(self) -> list[Route]:
        """The OpenAI dialect's routes, the custom voices' and /health (who may call each: ROUTE_ACCESS)."""
        return [
            Route(
                SPEECH_PATH,
                self.create_speech,
                "POST",
                errors=(400, 401, 413, 429, 500, 503),
                response_class=StreamingResponse,
                responses=SPEECH_RESPONSES,
            ),
            Route("/v1/models", self.list_models, response_model=ModelList, errors=(401,)),
            Route("/v1/models/{model_id}", self.get_model, response_model=ModelCard, errors=(401, 404)),
            # Open WebUI's model list for a custom TTS base URL: {"models": [{"id": ...}]}.
            Route("/v1/audio/models", self.list_audio_models, response_model=AudioModelList, errors=(401,)),
            Route("/v1/audio/voices", self.list_voices, response_model=VoiceList, errors=(401,)),
            # Custom voices: every route needs the key when one is set (they create, reveal or delete voices).
            *VoiceRoutes(self._settings, self._frontend, self._encoder, self._model).routes(),
            Route(
                "/health",
                self.health,
                responses={503: {"description": "Not ready: the body says why (same shape as 200)."}},
            ),
        ]

    @staticmethod
    def _dialect_error(path: str, error: APIError):
        return create_error_response(error, "elevenlabs") if path.startswith(elevenlabs.PREFIX) else None

    @staticmethod
    def _unauthorized(method: str, path: str, request_id: str) -> None:
        if path == SPEECH_PATH:  # a speech request turned away: logged and counted as one
            RequestRecord(request_id).finish("401")
        else:
            logger.info("unauthorized %s %s", method, path)  # escaped by the log filter

    async def create_speech(self, body: SpeechRequest, request: Request):
        """OpenAI createSpeech: streamed audio (chunked) or server-sent events. The `x-request-id` header
        comes from Serve's proxy, or from `RequestIds` where there is none."""
        fmt = body.response_format or self._settings.default_format
        speech = SpeechInput(
            body.input,
            body.voice_name,
            float(body.speed),
            body.seed,
            body.previous_request_ids,
            body.conversation,
            instructions=body.instructions,
        )
        stream = await self.start_speech(speech, fmt, request_id_of(request.scope))
        return stream.response(body.stream_format == "sse", {"Cache-Control": "no-cache"})

    async def start_speech(
        self,
        speech: SpeechInput,
        fmt: str,
        request_id: str,
        protocol: str = "http",
        part_of: Optional[RequestRecord] = None,
    ) -> StartedSpeech:
        """Admit, plan, start the encoder and wait for its first chunk: any failure before audio is raised
        here (for the caller's error shape); after it, the stream holds the lease and the request's record.
        Every dialect's and protocol's speech comes through here (the same admission, log line and metrics);
        `part_of` is the record of a whole this is one piece of (a WebSocket context), which logs for it."""
        record = RequestRecord(
            request_id, characters=len(speech.text), speed=speech.speed, protocol=protocol, part_of=part_of
        )
        clock = [time.perf_counter()]  # started, admitted, planned
        lease = await self._admit(record)
        try:
            clock.append(time.perf_counter())
            synthesis = await self._plan(speech, fmt, record)
            clock.append(time.perf_counter())
            stream = self._encoder.options(stream=True).encode.remote(EncodeRequest(synthesis, fmt, record.speed))
            first, times = await _first_audio(stream)
        except BaseException as exc:
            lease.release()
            record.finish("cancelled" if isinstance(exc, CLIENT_GONE) else str(status_of(exc)))
            raise
        record.mark_first_byte()
        times.stages = _stages(times, *clock, time.perf_counter())
        on_said = None
        if synthesis.remember:

            async def on_said(utterance, request_id=record.request_id, conversation=speech.conversation):
                await self._frontend.remember.remote(request_id, utterance, conversation)

        return StartedSpeech(first, stream, record, lease, times, on_said)

    async def _admit(self, record: RequestRecord):
        """A slot of the admission (429 when full, 503 while draining), or the refusal, logged and raised."""
        await self.model_replicas()  # keeps the admission's slots in step with the replicas that serve
        try:
            if self._settings.drain_flag.exists():
                raise ServiceUnavailableError("The server is shutting down; retry shortly.", code="shutting_down")
            return self._admission.admit()
        except APIError as exc:
            record.finish(str(exc.status_code))
            raise

    async def _plan(self, speech: SpeechInput, fmt: str, record: RequestRecord) -> SynthesisRequest:
        """The text frontend's plan (its 400s raised here) as the model's request."""
        if speech.instructions:
            logger.info("request %s: instructions are not supported by CSM-1B and were ignored", record.request_id)
        plan = await value_of(self._frontend.prepare.remote(speech))
        record.voice, record.fmt = plan.preset.name, fmt
        return plan.to_synthesis(record.request_id, speech.seed, remember=self._settings.utterance_memory_mb > 0)

    async def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard()])

    async def get_model(self, model_id: str) -> ModelCard:
        if model_id != ModelCard().id:
            raise NotFoundError(f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return ModelCard()

    async def list_audio_models(self) -> AudioModelList:
        return AudioModelList(models=[AudioModel()])

    async def list_voices(self, request: Request) -> VoiceList:
        """Presets and aliases for anyone; custom voices (a person's name, often) only with the key."""
        return VoiceList(voices=await self._frontend.voices.remote(include_custom=request.state.api_key_ok))

    async def model_replicas(self, max_age_s: float = 2.0) -> list[ReplicaHealth]:
        """Every model replica's published health (model/registry.py), read at most every `max_age_s`; the
        admission's slots become MAX_BATCH_SIZE per replica that can serve (at least one replica's worth, so
        with none serving requests get the model's 503 rather than a 429)."""
        if time.monotonic() - self._replicas_read > max_age_s:
            self._replicas_read = time.monotonic()
            self._replicas = await asyncio.to_thread(replicas.read, self._health_key)
            self._follow_replicas(self._replicas)
        return self._replicas

    def _follow_replicas(self, entries: list[ReplicaHealth]) -> None:
        if entries:
            serving = sum(r.serving for r in entries)
            self._admission.slots = max(1, serving) * self._settings.max_batch_size

    async def health(self, request: Request) -> JSONResponse:
        """200 when a model replica can serve and ffmpeg runs; 503 with the reason otherwise (api/health.py
        judges). `model` is the replica this call reached; `replicas` lists every one, and `degraded` names
        those that cannot serve. The full body only to a trusted caller (the API key, or this machine)."""
        model = await self._model.health.remote()
        encoder = await self._encoder.health.remote()
        published = await self.model_replicas(max_age_s=0)
        verdict = judge(model, published, encoder, self._model_replicas > 1, self._settings.drain_flag.exists())
        self._follow_replicas(verdict.replicas)
        if not request.state.trusted:
            return JSONResponse(verdict.public(), status_code=verdict.code)
        body = {
            "status": verdict.status,
            "model": model.body(),
            "replicas": [r.body() for r in verdict.replicas],
            "ffmpeg": encoder.ffmpeg,
            "voices": [v.id for v in await self._frontend.voices.remote()],
            "device": model.device,
            "in_flight": self._admission.active,
            "capacity": self._admission.capacity,
            "encoders_running": encoder.running,
            "encoders_warm": {"idle": encoder.warm, "pids": encoder.warm_pids},
            "model_replicas": {"configured": self._model_replicas, "serving": len(verdict.serving)},
            "utterance_memory": await self._frontend.memory_report.remote(),
        }
        if self._wyoming is not None:
            body["wyoming"] = self._wyoming.report()
        if degraded := verdict.degraded():
            body["degraded"] = degraded
        if verdict.reasons:
            body["reason"] = "; ".join(r[0] for r in verdict.reasons)
        return JSONResponse(body, status_code=verdict.code)
