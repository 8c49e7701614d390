"""What a speech request asks of the model: plain data, free of MLX.

The ingress builds a `SynthesisRequest` and the encoder forwards it to the model replica; neither process
runs MLX, so these types live apart from the engine (importing them loads numpy and pydantic only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..voices import VoicePreset

END = object()  # posted to a generation job after its request's last item (the scheduler's own marker)


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


@dataclass
class SynthesisRequest:
    """What the model deployment needs for one response."""

    chunks: list[str]
    preset: VoicePreset
    seed: Optional[int] = None
    context: list[ContextSegment] = field(default_factory=list)
    request_id: str = ""
    # A fixed frame count per chunk instead of the length-derived cap (warm-up, benchmarks).
    max_frames_per_chunk: Optional[int] = None
    # A custom voice's clip (its transcript and stored Mimi codes), sent along by the text frontend, which
    # owns the voice store: a model replica on another machine that has not seen the voice yet takes it from
    # here (and keeps it); one that has ignores it.
    voice_prompt: Optional[ContextSegment] = None
