"""Everything that crosses a DeploymentHandle, defined once: plain data, free of MLX and FastAPI.

The ingress builds a `SynthesisRequest`, the encoder forwards it to the model replica, and the replica's
stream comes back as `StreamItem`s: PCM `bytes`, then (when the request asked to be remembered) one
`Utterance`, then one `Usage`; the encoder adds one `StageTimes` before its first audio. Inside the model
replica, a generation job posts the same items, an error or `END` to its reader; `received` is the one
place that tells them apart. Importing this loads numpy and pydantic only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class _End:
    """The end of a generation job's items (the scheduler's own marker, never sent across a handle)."""

    def __repr__(self) -> str:
        return "END"


END = _End()


class VoiceParams(BaseModel):
    """What the model needs of a voice: CSM's sampling parameters, the speaker id and the output gain. A
    preset (voices/presets.py) is one of these plus its description and reference prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    speaker: int = Field(0, ge=0, le=31)
    temperature: float = Field(0.9, gt=0.0, le=2.0)
    top_k: int = Field(50, ge=1, le=2048)
    gain_db: float = Field(0.0, ge=-30.0, le=12.0)
    # A custom voice (voices/store.py): `name` is its id, and the model replica reads its clip from the store.
    custom: bool = False

    def params(self) -> VoiceParams:
        """These fields alone, as a plain VoiceParams (a preset's description and prompt left out): what
        crosses the handle to the model replica."""
        return VoiceParams(**{name: getattr(self, name) for name in VoiceParams.model_fields})


class StageTimes(BaseModel):
    """Where a response's first audio spent its time (ms), each stage measured inside the process that ran
    it (so no clocks are compared across machines). The encoder sends it just before the first audio."""

    stages: dict[str, float] = {}

    def header(self) -> str:
        """An HTTP `Server-Timing` value: `model;dur=61.2, encode;dur=1.9, ...`."""
        return ", ".join(f"{name};dur={ms:.1f}" for name, ms in self.stages.items())


class Usage(BaseModel):
    """Token counts of one response: text tokens in, CSM audio frames out (those delivered), and how often
    each guard against CSM's failure modes acted (engine/guards.py; not part of OpenAI's usage)."""

    input_tokens: int = 0
    output_tokens: int = 0
    guards: dict[str, int] = {}
    # Backbone positions CSM heard before the first chunk's text (the voice's clip and the earlier turns), as
    # prefilled: the request log's `context=`, where context across requests and sentences shows.
    context_positions: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def as_openai(self) -> dict:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass
class Utterance:
    """What a response said, for conversation context later: its voice, CSM speaker id, text and the Mimi
    codes generated (codebooks x frames, every chunk's frames in order). Kept by the text frontend's
    utterance memory under the response's request id."""

    voice: str
    speaker: int
    text: str
    codes: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes) + 2 * len(self.text)


# What a speech stream carries across handles: audio bytes, what was said (when remembered), the final
# Usage, and (from the encoder) the first audio's StageTimes.
StreamItem = Union[bytes, Utterance, Usage, StageTimes]


def received(item: Union[StreamItem, BaseException, _End]) -> Union[StreamItem, _End]:
    """An item a generation job posted, as its reader takes it: the error it carries raised here, else the
    item itself (`END` included, for the reader to stop at)."""
    if isinstance(item, BaseException):
        raise item
    return item


@dataclass
class ContextSegment:
    """One earlier utterance given to CSM as context: a speaker, its text and its audio.

    Give `audio` (float32 mono 24 kHz) or, when already known, its Mimi `codes` (codebooks x frames).
    This is the hook for conversation context (brief R6); today it carries voice prompts and the
    earlier chunks of the same request.
    """

    speaker: int
    text: str
    audio: Optional[np.ndarray] = None
    codes: Optional[np.ndarray] = None
    # Which Mimi made `codes` (engine's `codes_tag`), where it can differ from the engine's own: a custom
    # voice's stored codes. None: made by this engine (its own generated codes, an utterance's).
    codes_tag: Optional[str] = None


@dataclass
class SynthesisRequest:
    """What the model deployment needs for one response."""

    chunks: list[str]
    preset: VoiceParams
    seed: Optional[int] = None
    context: list[ContextSegment] = field(default_factory=list)
    request_id: str = ""
    # A fixed frame count per chunk instead of the length-derived cap (warm-up, benchmarks).
    max_frames_per_chunk: Optional[int] = None
    # A custom voice's clip (its transcript and stored Mimi codes), sent along by the text frontend, which
    # owns the voice store: a model replica on another machine that has not seen the voice yet takes it from
    # here (and keeps it); one that has ignores it.
    voice_prompt: Optional[ContextSegment] = None
    # Post an `Utterance` (the text and the codes generated) before the Usage, for the utterance memory.
    remember: bool = False


@dataclass
class EncodeRequest:
    """What the encoder needs for one response: the synthesis to ask the model for, the format, the speed."""

    synthesis: SynthesisRequest
    response_format: str
    speed: float = 1.0


@dataclass
class SpeechInput:
    """What a client asks to be spoken, in no dialect's shape: each ingress (OpenAI's body, ElevenLabs' body
    and path) builds one, and the ingress's `start_speech` and the text frontend take it."""

    text: str
    voice: Optional[str] = None  # a preset, alias or custom voice name or id; None: DEFAULT_VOICE
    speed: float = 1.0
    seed: Optional[int] = None
    # Context, the first given wins: earlier responses' ids, a conversation's last turns, or (ElevenLabs)
    # the latest utterance of this voice with this text.
    previous_request_ids: Optional[list[str]] = None
    conversation: Optional[str] = None
    previous_text: Optional[str] = None
    instructions: Optional[str] = None  # OpenAI's; CSM-1B has no such input (logged, not used)
    custom_voices: bool = True  # whether `voice` may name a custom voice (not over Wyoming while a key is set)


@dataclass
class SpeechPlan:
    """The text frontend's answer: the text chunks, in order, and the resolved voice."""

    chunks: list[str]
    preset: VoiceParams
    voice_prompt: Optional[ContextSegment] = None  # a custom voice's clip, for replicas that have not seen it
    # Earlier utterances as CSM context, oldest first (previous_request_ids, a conversation's last turns).
    context: list[ContextSegment] = field(default_factory=list)

    def to_synthesis(self, request_id: str, seed: Optional[int] = None, remember: bool = False) -> SynthesisRequest:
        """The model's request for this plan: the voice's model part alone (a preset's description and
        prompt stay here; the replica has its own copy of the prompts)."""
        return SynthesisRequest(
            self.chunks,
            self.preset.params(),
            seed=seed,
            context=self.context,
            request_id=request_id,
            voice_prompt=self.voice_prompt,
            remember=remember,
        )


class VoiceInfo(BaseModel):
    """One entry of the voice lists (a preset, an alias's target or a custom voice)."""

    id: str
    name: str
    description: str
