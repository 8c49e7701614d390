"""The ElevenLabs dialect, served by the same ingress under /elevenlabs (clients set the base URL
`http://host:8880/elevenlabs`): its text-to-speech routes (whole and streamed), voices and models, its
`xi-api-key` header and its error bodies.

It is a FastAPI app of its own, mounted on the ingress's app, because ElevenLabs' `GET /v1/models` (a bare
array) and `GET /v1/voices` clash with OpenAI's routes of the same paths, and because its errors have another
shape: `{"detail": {"status": code, "message": ...}}`, and FastAPI's own 422 list for validation (ElevenLabs
runs FastAPI too). Speech goes through the ingress's `start_speech`: the same admission, engine, streaming
per frame, log line and metrics as OpenAI's route; only the request and the output formats differ.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any, Optional

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from serve_app.api.contexts import SpeechContext, whole
from serve_app.api.errors import install_error_handlers
from serve_app.api.request_ids import request_id_of
from serve_app.api.routing import Route, add_routes
from serve_app.api.sockets import ElevenLabsSockets
from serve_app.core.constants import LOGGER_NAME, MODEL_NAME
from serve_app.core.errors import APIError, InvalidRequestError, NotFoundError
from serve_app.core.formats import ElevenLabsFormat
from serve_app.core.messages import SpeechInput
from serve_app.core.settings import Settings
from serve_app.text.chunking import split_sentences
from serve_app.text.frontend import spoken_text

logger = logging.getLogger(LOGGER_NAME)

PREFIX = "/elevenlabs"
DEFAULT_OUTPUT_FORMAT = "mp3_44100_128"  # ElevenLabs' default


MAX_STITCHED = 3  # ElevenLabs' limit on previous_request_ids and next_request_ids
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")


def elevenlabs_id(name: str) -> str:
    """A voice's id in ElevenLabs' form (clients check `^[a-zA-Z0-9]{10,40}$`): the name itself when it fits
    ("conversational"), else its letters and digits followed by a stable hash ("fast" -> "fast" + 16 hex)."""
    plain = _NOT_ALNUM.sub("", name)
    if 10 <= len(plain) <= 40 and plain == name:
        return plain
    return plain[:24] + hashlib.sha1(name.encode()).hexdigest()[:16]


class VoiceSettings(BaseModel):
    """ElevenLabs' voice_settings: `speed` is applied (pitch kept, as OpenAI's speed); stability, similarity
    and style have no CSM counterpart and are accepted."""

    model_config = ConfigDict(extra="allow")
    stability: Optional[float] = None
    similarity_boost: Optional[float] = None
    style: Optional[float] = None
    use_speaker_boost: Optional[bool] = None
    speed: Optional[float] = Field(None, ge=0.25, le=4.0)


class TextToSpeechRequest(BaseModel):
    """The body of POST /v1/text-to-speech/{voice_id}[/stream]. `model_id` may be any (one model here).

    Request stitching: `previous_request_ids` (at most 3, each an earlier response's `request-id`) put those
    utterances before the text as CSM context; without them, `previous_text` does when it is the text of a
    remembered utterance of the same voice (ElevenLabs, too, ignores it when ids are given). `next_text` and
    `next_request_ids` have no CSM counterpart (CSM hears what came before, not after): accepted, unused, as
    are language_code and pronunciation dictionaries."""

    model_config = ConfigDict(extra="allow")
    text: StrictStr
    model_id: Optional[str] = None
    language_code: Optional[str] = None
    voice_settings: Optional[VoiceSettings] = None
    seed: Optional[int] = Field(None, ge=0, le=4294967295)
    previous_text: Optional[str] = None
    next_text: Optional[str] = None
    previous_request_ids: Optional[list[StrictStr]] = None
    next_request_ids: Optional[list[StrictStr]] = None
    apply_text_normalization: Optional[str] = None


def _voice_not_found(exc: APIError, voice_id: str) -> APIError:
    """The voice is a path parameter: ElevenLabs answers an unknown one with 404."""
    if exc.code == "invalid_voice":
        return NotFoundError(f"A voice with the voice_id {voice_id} was not found.", code="voice_not_found")
    return exc


async def _events(context: SpeechContext, queue: asyncio.Queue):
    """A context's events as they come; its error, if it ends with one."""
    while True:
        if queue.empty() and context.task.done():
            if not context.task.cancelled() and (exc := context.task.exception()) is not None:
                raise exc
            return
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({getter, context.task}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            yield getter.result()
        else:
            getter.cancel()


class ElevenLabsRoutes:
    """The dialect's routes as data, bound to the ingress (its settings, frontend and `start_speech`)."""

    def __init__(self, settings: Settings, frontend, start_speech):
        self._settings = settings
        self._frontend = frontend
        self._start_speech = start_speech
        self._sockets = ElevenLabsSockets(settings, frontend, start_speech, self._voice_name)

    def app(self) -> FastAPI:
        app = FastAPI(title="Sesame TTS (ElevenLabs dialect)", docs_url=None, redoc_url=None)

        install_error_handlers(app, "elevenlabs")

        # The API key (xi-api-key or a bearer token) is checked on the headers by the ingress's RequestScreen.
        add_routes(
            app,
            [
                Route("/v1/text-to-speech/{voice_id}", self.convert, "POST"),
                Route("/v1/text-to-speech/{voice_id}/stream", self.convert, "POST"),
                Route("/v1/text-to-speech/{voice_id}/with-timestamps", self.convert_with_timestamps, "POST"),
                Route("/v1/text-to-speech/{voice_id}/stream/with-timestamps", self.stream_with_timestamps, "POST"),
                Route("/v1/voices", self.list_voices),
                Route("/v2/voices", self.search_voices),
                Route("/v1/voices/{voice_id}", self.get_voice),
                Route("/v1/models", self.list_models),
            ],
        )
        self._sockets.add_to(app)  # stream-input and multi-stream-input (api/sockets.py)
        return app

    async def convert(
        self,
        voice_id: str,
        body: TextToSpeechRequest,
        http: Request,
        output_format: ElevenLabsFormat = Query(DEFAULT_OUTPUT_FORMAT),  # type: ignore[valid-type]
        optimize_streaming_latency: Optional[int] = Query(None, ge=0, le=4),
        enable_logging: Optional[bool] = None,
    ) -> StreamingResponse:
        """Audio for the text, streamed as it is generated (both routes: the whole file arrives the same way
        it would be streamed; `optimize_streaming_latency` is accepted, every frame streams anyway)."""
        speech = await self._speech(voice_id, body)
        try:
            stream = await self._start_speech(speech, output_format, request_id_of(http.scope))
        except APIError as exc:
            raise _voice_not_found(exc, voice_id) from None
        return stream.response(False, {"Cache-Control": "no-cache"}, "request-id")

    async def _speech(self, voice_id: str, body: TextToSpeechRequest) -> SpeechInput:
        speed = body.voice_settings.speed if body.voice_settings and body.voice_settings.speed else 1.0
        for field in ("previous_request_ids", "next_request_ids"):
            if len(getattr(body, field) or ()) > MAX_STITCHED:
                raise InvalidRequestError(
                    f"{field} may hold at most {MAX_STITCHED} request ids.", param=field, code="invalid_request"
                )
        return SpeechInput(
            body.text,
            await self._voice_name(voice_id),
            float(speed),
            body.seed,
            body.previous_request_ids or None,
            previous_text=body.previous_text,
        )

    async def convert_with_timestamps(
        self,
        voice_id: str,
        body: TextToSpeechRequest,
        http: Request,
        output_format: ElevenLabsFormat = Query(DEFAULT_OUTPUT_FORMAT),  # type: ignore[valid-type]
    ) -> JSONResponse:
        """The whole audio (base64) and the alignment of its characters (docs: Voice agents)."""
        audio, alignments = bytearray(), []
        async for kind, payload in await self._timed(voice_id, body, output_format, http):
            if kind == "audio":
                audio += payload
            else:
                alignments.append(payload)
        given, spoken = whole(alignments)
        return JSONResponse(
            {"audio_base64": base64.b64encode(audio).decode(), "alignment": given, "normalized_alignment": spoken}
        )

    async def stream_with_timestamps(
        self,
        voice_id: str,
        body: TextToSpeechRequest,
        http: Request,
        output_format: ElevenLabsFormat = Query(DEFAULT_OUTPUT_FORMAT),  # type: ignore[valid-type]
    ) -> StreamingResponse:
        """NDJSON: audio as it is generated, and each sentence's alignment (times from the response's start)
        on the next line once the sentence's audio is complete."""
        events = await self._timed(voice_id, body, output_format, http)

        async def lines() -> AsyncIterator[str]:
            offset = 0  # ms of audio the earlier sentences' alignments cover
            async for kind, payload in events:
                if kind == "audio":
                    line = {"audio_base64": base64.b64encode(payload).decode()}
                    line.update(alignment=None, normalized_alignment=None)
                else:
                    line = {"audio_base64": "", "alignment": payload[0].http(offset)}
                    line["normalized_alignment"] = payload[1].http(offset)
                    offset += payload[0].duration_ms
                yield json.dumps(line, separators=(",", ":")) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson", headers={"Cache-Control": "no-cache"})

    async def _timed(self, voice_id: str, body: TextToSpeechRequest, fmt: str, http: Request):
        """The text's sentences as one context (api/contexts.py): its events, the first already received,
        so that a refusal before audio gets its status."""
        speech = await self._speech(voice_id, body)
        spoken_text(body.text, self._settings.strip_markdown)  # nothing to speak: HTTP's 400, not an empty clip
        queue: asyncio.Queue = asyncio.Queue()
        context = SpeechContext(
            self._start_speech,
            self._settings,
            self._sockets.ffmpeg,
            voice=speech.voice,
            fmt=fmt,
            speed=speech.speed,
            protocol="http",
            emit=lambda kind, payload: queue.put((kind, payload)),
            custom_voices=http.state.api_key_ok,
            auto_mode=True,
            stitching=speech,
            request_id=request_id_of(http.scope),
        )
        for sentence in split_sentences(body.text):
            context.add_text(sentence)
        context.flush()
        context.close()
        events = _events(context, queue)
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            first = None
        except APIError as exc:
            raise _voice_not_found(exc, voice_id) from None

        async def all_events():
            try:
                if first is not None:
                    yield first
                    async for event in events:
                        yield event
            finally:
                context.cancel()

        return all_events()

    async def _voice_name(self, voice_id: str) -> str:
        """Our name for a voice id in ElevenLabs' form (`elevenlabs_id`); anything else (a preset's own name, an
        alias, a custom voice's name or id) as it is, for the voice directory to resolve."""
        voices = await self._frontend.voices.remote(include_custom=True)
        return next((info.id for info in voices if elevenlabs_id(info.id) == voice_id), voice_id)

    async def _voices(self, request: Request) -> list[dict]:
        """Presets and aliases for anyone; custom voices only with the key (as on the OpenAI side)."""
        voices = []
        for info in await self._frontend.voices.remote(include_custom=request.state.api_key_ok):
            custom = info.id.startswith("voice_")
            voices.append(
                {
                    "voice_id": elevenlabs_id(info.id),
                    "name": info.name,
                    "category": "cloned" if custom else "premade",
                    "description": info.description,
                    "labels": {"sesame_voice": info.id},
                    "preview_url": None,
                    "high_quality_base_model_ids": [MODEL_NAME],
                }
            )
        return voices

    async def list_voices(self, request: Request) -> dict:
        return {"voices": await self._voices(request)}

    async def search_voices(
        self, request: Request, page_size: int = Query(10, ge=1, le=100), search: Optional[str] = None
    ) -> dict:
        voices = [v for v in await self._voices(request) if not search or search.lower() in v["name"].lower()]
        return {
            "voices": voices[:page_size],
            "has_more": len(voices) > page_size,
            "total_count": len(voices),
            "next_page_token": None,
        }

    async def get_voice(self, request: Request, voice_id: str) -> dict:
        for voice in await self._voices(request):
            if voice["voice_id"] == voice_id:
                return voice
        raise NotFoundError(f"A voice with the voice_id {voice_id} was not found.", code="voice_not_found")

    async def list_models(self) -> list[dict[str, Any]]:
        """ElevenLabs' model list is a bare JSON array."""
        return [
            {
                "model_id": MODEL_NAME,
                "name": "Sesame CSM-1B",
                "description": "Sesame's conversational speech model, served locally on MLX.",
                "can_do_text_to_speech": True,
                "can_do_voice_conversion": False,
                "can_use_style": False,
                "can_use_speaker_boost": False,
                "can_be_finetuned": False,
                "languages": [{"language_id": "en", "name": "English"}],
                "max_characters_request_free_user": self._settings.max_input_length,
                "max_characters_request_subscribed_user": self._settings.max_input_length,
                "maximum_text_length_per_request": self._settings.max_input_length,
            }
        ]
