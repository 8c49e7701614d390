"""TextFrontend: validates and chunks the input text and resolves the voice preset."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import InvalidRequestError
from ..logs import configure_logging
from ..protocol import SpeechRequest, VoiceInfo
from ..settings import Settings
from ..text import chunk_text, normalize, unspeakable
from ..voices import VoiceLibrary, VoicePreset

logger = logging.getLogger("sesame_tts")


@dataclass
class SpeechPlan:
    """What to say and in which voice: the text chunks, in order, and the resolved preset."""

    chunks: list[str]
    preset: VoicePreset


class TextFrontend:
    def __init__(self, settings: Settings, voices: VoiceLibrary):
        configure_logging(settings.log_level)
        self._settings = settings
        self._voices = voices

    def prepare(self, request: SpeechRequest) -> SpeechPlan | InvalidRequestError:
        """Check the input and voice, and split the text into chunks.

        Invalid input is an expected outcome, so the 400 comes back as a value for the ingress to raise:
        an exception raised here would make Ray Serve log a "Request failed" traceback for every typo.
        """
        try:
            return self._plan(request)
        except InvalidRequestError as exc:
            return exc

    def _plan(self, request: SpeechRequest) -> SpeechPlan:
        text = request.input
        limit = self._settings.max_input_length
        if len(text) > limit:
            raise InvalidRequestError(
                f"Input is too long: {len(text)} characters; the maximum is {limit}.",
                param="input", code="string_above_max_length",
            )
        if not normalize(text):
            raise InvalidRequestError("Input is empty: give some text to speak.", param="input", code="empty_input")
        problem = unspeakable(text)
        if problem:
            raise InvalidRequestError(problem, param="input", code="invalid_input")
        preset = self._voices.resolve(request.voice_name or self._settings.default_voice)
        if request.instructions:
            logger.info("instructions are not supported by CSM-1B and were ignored")
        chunks = chunk_text(text, self._settings.chunk_max_chars, self._settings.first_chunk_max_chars)
        return SpeechPlan(chunks=chunks, preset=preset)

    def voices(self) -> list[VoiceInfo]:
        return [VoiceInfo(id=p.name, name=p.name, description=p.description) for p in self._voices.presets.values()]
