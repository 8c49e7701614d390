"""Custom voices over HTTP, in OpenAI's shape: voice consents (create, list, retrieve, update, delete) and
voices (create; retrieve and delete as our extensions, since OpenAI's spec has no such routes yet).

Creating a voice goes through every stage once: the text frontend checks the consent, the name and the
bound; the encoder decodes the upload with ffmpeg (pipes only, upload demuxers only, output capped); the
clip is checked here (length, not silent); the model replica encodes it with Mimi and checks it fits CSM's
context; the frontend stores it; the model prefills it. Nothing is stored unless every step passed.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from fastapi import Query, Request
from pydantic import BaseModel, ConfigDict, StrictStr
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.api.errors import body_error
from serve_app.api.limits import Gate
from serve_app.api.routing import Route
from serve_app.core.constants import LOGGER_NAME
from serve_app.core.errors import InvalidRequestError, PayloadTooLargeError, PermissionDeniedError, value_of
from serve_app.core.settings import Settings
from serve_app.text.chunking import why_unspeakable
from serve_app.voices.store import (
    ACCEPTED_TYPES,
    MAX_TRANSCRIPT_CHARS,
    MAX_UPLOAD_BYTES,
    MIN_CONSENT_S,
    MIN_SAMPLE_S,
    ConsentRecord,
    VoiceRecord,
    check_clip,
    display_name,
    language_tag,
    new_id,
)

logger = logging.getLogger(LOGGER_NAME)

CONSENTS_PATH = "/v1/audio/voice_consents"
VOICES_PATH = "/v1/audio/voices"
UPLOAD_PATHS = (CONSENTS_PATH, VOICES_PATH)  # their bodies may hold a 10 MiB recording
UPLOAD_BODY_BYTES = MAX_UPLOAD_BYTES + 64 * 1024  # the recording and the form around it
# Uploads are admitted before their body is read: each buffers up to 10 MiB here and runs an ffmpeg decode,
# and a voice sample then runs Mimi on the model's only thread, which every stream shares. So: two uploads
# at once, four more waiting, 429 beyond; and one sample encode at a time.
UPLOADS_AT_ONCE = 2
UPLOADS_WAITING = 4


class ConsentList(BaseModel):
    """OpenAI's VoiceConsentListResource (cursor pagination)."""

    object: str = "list"
    data: list[ConsentRecord]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool = False


class ConsentDeleted(BaseModel):
    id: str
    object: str = "audio.voice_consent"
    deleted: bool = True


class VoiceDeleted(BaseModel):
    """As the openai SDK's `VoiceDeleted` (the spec has no delete route yet)."""

    id: str
    object: str = "audio.voice.deleted"
    deleted: bool = True


class UpdateConsentRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: StrictStr


def _multipart(fields: dict[str, dict], required: list[str]) -> dict:
    """The OpenAPI request body of a multipart upload route."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": {"type": "object", "properties": fields, "required": required}}
            },
        }
    }


_FILE = {"type": "string", "format": "binary"}
CONSENT_FORM = _multipart(
    {"name": {"type": "string"}, "recording": _FILE, "language": {"type": "string"}}, ["name", "recording", "language"]
)
VOICE_FORM = _multipart(
    {
        "name": {"type": "string"},
        "audio_sample": _FILE,
        "consent": {"type": "string"},
        "transcript": {
            "type": "string",
            "description": "Extension: what the sample says. CSM "
            "clones best from the clip and its transcript; without it, the clip alone.",
        },
    },
    ["name", "audio_sample", "consent"],
)


class VoiceRoutes:
    """The routes and their handlers; `routes()` lists them as data for the ingress to add."""

    def __init__(self, settings: Settings, frontend, encoder, model):
        self._settings = settings
        self._frontend = frontend
        self._encoder = encoder
        self._model = model
        self._uploads = Gate(UPLOADS_AT_ONCE, UPLOADS_WAITING, "upload")
        self._sample_encodes = Gate(1, UPLOADS_AT_ONCE, "voice sample encode")

    def routes(self) -> list[Route]:
        consent = f"{CONSENTS_PATH}/{{consent_id}}"
        create = (400, 401, 403, 413, 429, 503, 507)
        return [
            Route(CONSENTS_PATH, self.create_consent, "POST", ConsentRecord, create, openapi_extra=CONSENT_FORM),
            Route(CONSENTS_PATH, self.list_consents, "GET", ConsentList, (400, 401)),
            Route(consent, self.get_consent, "GET", ConsentRecord, (401, 404)),
            Route(consent, self.update_consent, "POST", ConsentRecord, (400, 401, 404)),
            Route(consent, self.delete_consent, "DELETE", ConsentDeleted, (401, 404)),
            Route(VOICES_PATH, self.create_voice, "POST", VoiceRecord, create, openapi_extra=VOICE_FORM),
            Route(f"{VOICES_PATH}/{{voice_id}}", self.get_voice, "GET", VoiceRecord, (401, 404)),
            Route(f"{VOICES_PATH}/{{voice_id}}", self.delete_voice, "DELETE", VoiceDeleted, (401, 404)),
        ]

    # --- consents -------------------------------------------------------------------------------------

    async def create_consent(self, request: Request) -> ConsentRecord:
        self._creation_allowed()
        async with self._uploads.enter():
            return await self._create_consent(request)

    async def _create_consent(self, request: Request) -> ConsentRecord:
        form = await _form(request)
        name = display_name(_text(form, "name"), "name")
        language = language_tag(_text(form, "language"))
        data = await _upload(form, "recording")
        pcm = await value_of(self._encoder.decode.remote(data, self._settings.custom_voice_max_s, "recording"))
        check_clip(pcm, "recording", MIN_CONSENT_S, self._settings.custom_voice_max_s)
        record = await value_of(self._frontend.add_consent.remote(name, language, pcm))
        logger.info("voice consent %s created", record.id)
        return record

    async def list_consents(self, limit: int = Query(20, ge=1, le=100), after: Optional[str] = None) -> ConsentList:
        records, more = await value_of(self._frontend.consent_page.remote(limit, after))
        return ConsentList(
            data=records,
            first_id=records[0].id if records else None,
            last_id=records[-1].id if records else None,
            has_more=more,
        )

    async def get_consent(self, consent_id: str) -> ConsentRecord:
        return await value_of(self._frontend.consent.remote(consent_id))

    async def update_consent(self, consent_id: str, body: UpdateConsentRequest) -> ConsentRecord:
        return await value_of(self._frontend.rename_consent.remote(consent_id, display_name(body.name, "name")))

    async def delete_consent(self, consent_id: str) -> ConsentDeleted:
        await value_of(self._frontend.delete_consent.remote(consent_id))
        logger.info("voice consent %s deleted", consent_id)
        return ConsentDeleted(id=consent_id)

    # --- voices ---------------------------------------------------------------------------------------

    async def create_voice(self, request: Request) -> VoiceRecord:
        self._creation_allowed()
        async with self._uploads.enter():
            return await self._create_voice(request)

    async def _create_voice(self, request: Request) -> VoiceRecord:
        form = await _form(request)
        kind = _text(form, "type")
        if kind not in (None, "audio_sample"):
            raise InvalidRequestError(
                "Only voices cloned from an audio sample are supported: CSM clones a voice "
                "from a clip, not from a text prompt.",
                param="type",
                code="unsupported_value",
            )
        name = display_name(_text(form, "name"), "name")
        consent = _text(form, "consent")
        if not consent:
            raise InvalidRequestError(
                "Missing required parameter: 'consent'.", param="consent", code="missing_required_parameter"
            )
        transcript = _transcript(_text(form, "transcript"))
        data = await _upload(form, "audio_sample")
        await value_of(self._frontend.check_new_voice.remote(name, consent))
        max_s = self._settings.custom_voice_max_s
        pcm = await value_of(self._encoder.decode.remote(data, max_s, "audio_sample"))
        duration = check_clip(pcm, "audio_sample", MIN_SAMPLE_S, max_s)
        async with self._sample_encodes.enter():  # Mimi on the model's thread: one sample at a time
            codes, codes_tag = await value_of(self._model.encode_custom_voice.remote(pcm, transcript))
        record = VoiceRecord(
            id=new_id("voice"),
            name=name,
            created_at=int(time.time()),
            consent=consent,
            transcript=transcript,
            duration_s=duration,
            conditioning="audio_and_transcript" if transcript else "audio_only",
        )
        record = await value_of(self._frontend.add_voice.remote(record, pcm, codes, codes_tag))
        try:  # prefilled now; any replica that has not would do it on the voice's first request
            await self._model.add_custom_voice.remote(record.id, transcript, codes)
        except Exception as exc:
            logger.warning("custom voice %s stored but not prefilled yet: %s", record.id, exc)
        logger.info("custom voice %s created (%.1f s, %s)", record.id, duration, record.conditioning)
        return record

    async def get_voice(self, voice_id: str) -> VoiceRecord:
        return await value_of(self._frontend.custom_voice.remote(voice_id))

    async def delete_voice(self, voice_id: str) -> VoiceDeleted:
        await value_of(self._frontend.delete_voice.remote(voice_id))
        await self._model.forget_custom_voice.remote(voice_id)
        logger.info("custom voice %s deleted", voice_id)
        return VoiceDeleted(id=voice_id)

    def _creation_allowed(self) -> None:
        if not self._settings.custom_voices:
            raise PermissionDeniedError(
                "Creating custom voices is turned off on this server (CUSTOM_VOICES=false).",
                code="custom_voices_disabled",
            )


async def _form(request: Request) -> FormData:
    """The multipart form, with bounds on its parts (the body's size is bounded by the middleware)."""
    try:
        return await request.form(max_files=2, max_fields=16, max_part_size=64 * 1024)
    except StarletteHTTPException as exc:
        if body_error(exc.status_code, str(exc.detail)) is not None:  # too large (413) or too slow (408)
            raise
        raise InvalidRequestError(
            f"The request body must be multipart/form-data: {exc.detail}", code="invalid_multipart"
        ) from None


def _text(form: FormData, field: str) -> Optional[str]:
    value = form.get(field)
    if isinstance(value, UploadFile):
        raise InvalidRequestError(
            f"Invalid value for '{field}': expected text, got a file.", param=field, code="invalid_type"
        )
    return value


def _transcript(value: Optional[str]) -> Optional[str]:
    text = (value or "").strip()
    if not text:
        return None
    if len(text) > MAX_TRANSCRIPT_CHARS:
        raise InvalidRequestError(
            f"The transcript is longer than {MAX_TRANSCRIPT_CHARS} characters.",
            param="transcript",
            code="string_above_max_length",
        )
    problem = why_unspeakable(text)
    if problem:
        raise InvalidRequestError(problem.replace("input", "transcript"), param="transcript", code="invalid_input")
    return text


async def _upload(form: FormData, field: str) -> bytes:
    """The uploaded file's bytes: present, a file, of an accepted type, not empty, at most 10 MiB."""
    upload = form.get(field)
    if upload is None:
        raise InvalidRequestError(
            f"Missing required parameter: '{field}'.", param=field, code="missing_required_parameter"
        )
    if not isinstance(upload, UploadFile):
        raise InvalidRequestError(
            f"Invalid value for '{field}': expected an audio file.", param=field, code="invalid_type"
        )
    kind = (upload.content_type or "").split(";")[0].strip().lower()
    if kind and kind not in ACCEPTED_TYPES and not kind.startswith("audio/"):
        raise InvalidRequestError(
            f"Invalid file type for '{field}': {kind}. Send audio/mpeg, audio/wav, audio/ogg, "
            "audio/aac, audio/flac, audio/webm or audio/mp4.",
            param=field,
            code="unsupported_file_type",
        )
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise PayloadTooLargeError(f"The file in '{field}' is larger than {MAX_UPLOAD_BYTES} bytes (10 MiB).")
    if not data:
        raise InvalidRequestError(f"The file in '{field}' is empty.", param=field, code="empty_file")
    return data
