"""Request and response models of the HTTP API.

`SpeechRequest` mirrors OpenAI's createSpeech body field for field, in the documentation's order; our
extensions are fenced off below it. `extra="allow"` keeps clients that send newer or vendor fields working:
unknown fields are accepted and ignored.
"""

from __future__ import annotations

import time
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from serve_app.core.constants import MODEL_NAME
from serve_app.core.formats import ResponseFormat
from serve_app.core.messages import VoiceInfo


class VoiceRef(BaseModel):
    """OpenAI's object form of `voice` (a custom voice id)."""

    model_config = ConfigDict(extra="allow")
    id: StrictStr


class SpeechRequest(BaseModel):
    """POST /v1/audio/speech."""

    model_config = ConfigDict(extra="allow")

    # --- OpenAI createSpeech, in the documentation's order ---
    # Any model name is accepted: this server has one model. Optional so the brief's bare curl works.
    model: StrictStr = MODEL_NAME
    # Length limits depend on MAX_INPUT_LENGTH and are checked by the text frontend.
    input: StrictStr
    # A preset name, an OpenAI voice name (mapped through voices/aliases.yaml), or {"id": name}.
    # Optional: DEFAULT_VOICE is used when absent.
    voice: Optional[Union[StrictStr, VoiceRef]] = None
    # CSM-1B has no instruction input: accepted for compatibility, logged, and not used.
    instructions: Optional[StrictStr] = Field(None, max_length=4096)
    # None means DEFAULT_FORMAT.
    response_format: Optional[ResponseFormat] = None
    speed: StrictFloat = Field(1.0, ge=0.25, le=4.0)  # StrictFloat still takes JSON integers
    stream_format: Literal["audio", "sse"] = "audio"

    # --- Extensions (not in OpenAI's API) ---
    # Makes sampling reproducible: the same seed, text and voice give the same audio.
    seed: Optional[StrictInt] = Field(None, ge=0, le=2**63 - 1)
    # Conversation context (README, "Conversation context"): earlier responses' `x-request-id`s, oldest
    # first, whose speech CSM hears before this text; or a client-chosen conversation id whose last turns
    # the server keeps and uses (set it once, e.g. in OpenClaw's extraBody).
    previous_request_ids: Optional[list[StrictStr]] = Field(None, max_length=3)
    conversation: Optional[StrictStr] = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")

    @property
    def voice_name(self) -> Optional[str]:
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice


_STARTED = int(time.time())


class ModelCard(BaseModel):
    id: str = MODEL_NAME
    object: Literal["model"] = "model"
    created: int = _STARTED  # stable for the life of the server
    owned_by: str = "sesame"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AudioModel(BaseModel):
    """An entry of Open WebUI's TTS model list (GET /v1/audio/models)."""

    id: str = MODEL_NAME
    name: str = "Sesame CSM-1B"


class AudioModelList(BaseModel):
    models: list[AudioModel]


class VoiceList(BaseModel):
    voices: list[VoiceInfo]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error body; every non-2xx answer of this server has this shape."""

    error: ErrorDetail
