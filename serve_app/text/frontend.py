"""TextFrontend: the deployment that turns what a client asked for into a speech plan: it checks and chunks
the text, resolves the voice through the voice directory (voices/directory.py), and finds the context in the
utterance memory (text/utterances.py). It also owns the custom-voice store's writes (one owner: it sweeps
what an interrupted write left).

Invalid input is an expected outcome, so a 400 or 404 comes back as a value (core/errors.errors_as_values)
for the ingress to raise: an exception raised here would make Ray Serve log a "Request failed" traceback for
every typo."""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from serve_app.core.constants import LOGGER_NAME
from serve_app.core.errors import APIError, InvalidRequestError, NotFoundError, errors_as_values
from serve_app.core.logs import configure_logging
from serve_app.core.messages import SpeechInput, SpeechPlan, Utterance, VoiceInfo
from serve_app.core.settings import Settings
from serve_app.text.chunking import chunk_text, normalize, why_unspeakable, with_terminal_punctuation
from serve_app.text.markdown import strip_markdown
from serve_app.text.utterances import UtteranceMemory
from serve_app.voices.directory import VoiceDirectory
from serve_app.voices.presets import VoiceLibrary
from serve_app.voices.store import ConsentRecord, CustomVoiceStore, VoiceRecord

logger = logging.getLogger(LOGGER_NAME)


def spoken_text(text: str, strip: bool) -> str:
    """What will be spoken of `text` (markdown, code blocks and emoji out with `strip`), or the 400 that says
    why nothing would be. Every listener asks this: HTTP refuses, Wyoming answers with an empty clip."""
    if not normalize(text):
        raise InvalidRequestError("Input is empty: give some text to speak.", param="input", code="empty_input")
    problem = why_unspeakable(text)
    if problem:
        raise InvalidRequestError(problem, param="input", code="invalid_input")
    if strip:
        text = strip_markdown(text)
        if why_unspeakable(text):
            raise InvalidRequestError(
                "Input has nothing to speak once markdown, code blocks and emoji are left out (STRIP_MARKDOWN).",
                param="input",
                code="empty_input",
            )
    return text


def speakable(text: str, strip: bool) -> bool:
    """Whether `spoken_text` finds something to speak (a listener of text streams skips what it does not)."""
    try:
        spoken_text(text, strip)
    except InvalidRequestError:
        return False
    return True


class TextFrontend:
    def __init__(self, settings: Settings, voices: VoiceLibrary):
        configure_logging(settings.log_level)
        self._settings = settings
        self._store = CustomVoiceStore(settings)
        self._voices = VoiceDirectory(voices, self._store)
        # The one frontend owns the store: what a crash or a full disk cut short is swept now.
        if removed := self._store.sweep():
            logger.info(
                "custom voice store: removed %d leftover(s) of interrupted writes: %s", len(removed), ", ".join(removed)
            )
        self._memory = UtteranceMemory(
            int(settings.utterance_memory_mb * 1024 * 1024),
            settings.utterance_max_age_s,
            settings.conversation_turns,
            settings.conversation_max_age_s,
        )

    @errors_as_values
    def prepare(self, speech: SpeechInput) -> SpeechPlan | APIError:
        """Check the input and voice, split the text into chunks, and find the context: the utterances
        named by `previous_request_ids` (oldest first), else the `conversation`'s last turns, else (the
        ElevenLabs dialect's `previous_text`) the latest utterance of this voice with that text."""
        plan = self._plan(speech.text, speech.voice, speech.custom_voices)
        if speech.previous_request_ids:
            plan.context = self._memory.context(speech.previous_request_ids)
        elif speech.conversation is not None:
            plan.context = self._memory.conversation(speech.conversation)
        elif speech.previous_text:
            plan.context = self._memory.matching_text(plan.preset.name, speech.previous_text)
        return plan

    def remember(self, request_id: str, utterance: Utterance, conversation: Optional[str] = None) -> None:
        """A finished response's utterance, for later context (and the conversation's next turn)."""
        self._memory.remember(request_id, utterance, conversation)

    def memory_report(self) -> dict:
        return self._memory.report()

    def _plan(self, text: str, voice: Optional[str], custom_voices: bool = True) -> SpeechPlan:
        limit = self._settings.max_input_length
        if len(text) > limit:
            raise InvalidRequestError(
                f"Input is too long: {len(text)} characters; the maximum is {limit}.",
                param="input",
                code="string_above_max_length",
            )
        # The voice first: a request for a voice that does not exist costs a lookup, not a pass over its text.
        preset = self._voices.resolve(voice or self._settings.default_voice, custom_voices)
        text = spoken_text(text, self._settings.strip_markdown)
        chunks = chunk_text(text, self._settings.chunk_max_chars, self._settings.first_chunk_max_chars)
        if self._settings.terminal_punctuation:
            chunks = [with_terminal_punctuation(chunk) for chunk in chunks]
        return SpeechPlan(chunks=chunks, preset=preset, voice_prompt=self._voices.prompt(preset))

    def voices(self, include_custom: bool = True) -> list[VoiceInfo]:
        return self._voices.list(include_custom)

    @errors_as_values
    def check_voice(self, voice: Optional[str], custom_voices: bool = True) -> str | APIError:
        """The voice's resolved name, or its 400 (a streaming protocol asks before any text arrives)."""
        return self._voices.resolve(voice or self._settings.default_voice, custom_voices).name

    # --- the custom-voice store's writes ---------------------------------------------------------------

    @errors_as_values
    def check_new_voice(self, name: str, consent: str) -> None | APIError:
        """Before a sample is decoded: the consent exists, the name is free and there is room."""
        self._store.check_new_voice(name, consent, self._voices.taken_names())
        return None

    @errors_as_values
    def add_voice(
        self, record: VoiceRecord, sample: np.ndarray, codes: np.ndarray, codes_tag: str
    ) -> VoiceRecord | APIError:
        return self._store.add_voice(record, sample, codes, codes_tag, self._voices.taken_names())

    @errors_as_values
    def custom_voice(self, voice_id: str) -> VoiceRecord | APIError:
        record = self._store.voices().get(voice_id)
        if record is None:
            raise NotFoundError(f"No custom voice with id '{voice_id}'.", param="voice_id", code="voice_not_found")
        return record

    @errors_as_values
    def delete_voice(self, voice_id: str) -> None | APIError:
        self._store.delete_voice(voice_id)
        self._voices.forget(voice_id)
        return None

    @errors_as_values
    def add_consent(self, name: str, language: str, recording: np.ndarray) -> ConsentRecord | APIError:
        return self._store.add_consent(name, language, recording)

    @errors_as_values
    def consent(self, consent_id: str) -> ConsentRecord | APIError:
        return self._store.consent(consent_id)

    @errors_as_values
    def consent_page(self, limit: int, after: Optional[str]) -> tuple[list[ConsentRecord], bool] | APIError:
        return self._store.page(limit, after)

    @errors_as_values
    def rename_consent(self, consent_id: str, name: str) -> ConsentRecord | APIError:
        return self._store.rename_consent(consent_id, name)

    @errors_as_values
    def delete_consent(self, consent_id: str) -> None | APIError:
        self._store.delete_consent(consent_id)
        return None
