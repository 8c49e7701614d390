"""TextFrontend: validates and chunks the input text, resolves the voice (a preset or a custom voice), and
keeps the custom-voice store (consents and voices, voices/store.py).

Invalid input is an expected outcome, so a 400 or 404 comes back as a value for the ingress to raise: an
exception raised here would make Ray Serve log a "Request failed" traceback for every typo."""

from __future__ import annotations

import functools
import logging
from typing import Optional

import numpy as np

from serve_app.core.constants import LOGGER_NAME
from serve_app.core.errors import APIError, InvalidRequestError, NotFoundError
from serve_app.core.logs import configure_logging
from serve_app.core.messages import ContextSegment, SpeechPlan, Utterance, VoiceInfo
from serve_app.core.settings import Settings
from serve_app.text.chunking import chunk_text, normalize, why_unspeakable, with_terminal_punctuation
from serve_app.text.markdown import strip_markdown
from serve_app.text.memory import UtteranceMemory
from serve_app.voices.presets import VoiceLibrary, VoicePreset, elevenlabs_id
from serve_app.voices.store import ConsentRecord, CustomVoiceStore, VoiceRecord

logger = logging.getLogger(LOGGER_NAME)


class TextFrontend:
    def __init__(self, settings: Settings, voices: VoiceLibrary):
        configure_logging(settings.log_level)
        self._settings = settings
        self._voices = voices
        self._store = CustomVoiceStore(settings)
        # The one frontend owns the store: what a crash or a full disk cut short is swept now.
        if removed := self._store.sweep():
            logger.info(
                "custom voice store: removed %d leftover(s) of interrupted writes: %s", len(removed), ", ".join(removed)
            )
        self._prompts: dict[str, ContextSegment] = {}
        self._memory = UtteranceMemory(
            int(settings.utterance_memory_mb * 1024 * 1024),
            settings.utterance_max_age_s,
            settings.conversation_turns,
            settings.conversation_max_age_s,
        )

    @staticmethod
    def _errors_as_values(method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except APIError as exc:
                return exc

        return wrapper

    @_errors_as_values
    def prepare(
        self,
        text: str,
        voice: Optional[str],
        previous_request_ids: Optional[list[str]] = None,
        conversation: Optional[str] = None,
        previous_text: Optional[str] = None,
    ) -> SpeechPlan | APIError:
        """Check the input and voice, split the text into chunks, and find the context: the utterances
        named by `previous_request_ids` (oldest first), else the `conversation`'s last turns, else (the
        ElevenLabs dialect's `previous_text`) the latest utterance of this voice with that text."""
        plan = self._plan(text, voice)
        if previous_request_ids:
            plan.context = self._memory.context(previous_request_ids)
        elif conversation is not None:
            plan.context = self._memory.conversation(conversation)
        elif previous_text:
            plan.context = self._memory.matching_text(plan.preset.name, previous_text)
        return plan

    def remember(self, request_id: str, utterance: Utterance, conversation: Optional[str] = None) -> None:
        """A finished response's utterance, for later context (and the conversation's next turn)."""
        self._memory.remember(request_id, utterance, conversation)

    def memory_report(self) -> dict:
        return self._memory.report()

    def _plan(self, text: str, voice: Optional[str]) -> SpeechPlan:
        limit = self._settings.max_input_length
        if len(text) > limit:
            raise InvalidRequestError(
                f"Input is too long: {len(text)} characters; the maximum is {limit}.",
                param="input",
                code="string_above_max_length",
            )
        # The voice first: a request for a voice that does not exist costs a lookup, not a pass over its text.
        preset = self.resolve(voice or self._settings.default_voice)
        if not normalize(text):
            raise InvalidRequestError("Input is empty: give some text to speak.", param="input", code="empty_input")
        problem = why_unspeakable(text)
        if problem:
            raise InvalidRequestError(problem, param="input", code="invalid_input")
        if self._settings.strip_markdown:
            text = strip_markdown(text)
            if why_unspeakable(text):
                raise InvalidRequestError(
                    "Input has nothing to speak once markdown, code blocks and emoji are left out (STRIP_MARKDOWN).",
                    param="input",
                    code="empty_input",
                )
        chunks = chunk_text(text, self._settings.chunk_max_chars, self._settings.first_chunk_max_chars)
        if self._settings.terminal_punctuation:
            chunks = [with_terminal_punctuation(chunk) for chunk in chunks]
        return SpeechPlan(chunks=chunks, preset=preset, voice_prompt=self._voice_prompt(preset))

    def _voice_prompt(self, preset: VoicePreset) -> Optional[ContextSegment]:
        """A custom voice's stored transcript and codes (read once; they never change)."""
        if not preset.custom:
            return None
        if preset.name not in self._prompts:
            stored = self._store.prompt(preset.name)
            if stored is None:
                return None
            self._prompts[preset.name] = ContextSegment(0, stored[0], codes=stored[1])
        return self._prompts[preset.name]

    def resolve(self, name: str) -> VoicePreset:
        """A preset or alias first, then a custom voice by id or name; else the presets' 400, naming all."""
        try:
            return self._voices.resolve(name)
        except InvalidRequestError as exc:
            record = self._store.find(name)
            if record is None:  # ElevenLabs' id of a preset or custom voice (elevenlabs_id)
                known = {elevenlabs_id(v.id): v.id for v in self.voices()}
                if name in known:
                    return self.resolve(known[name])
                custom = [v.name for v in self._store.voices().values()]
                if custom:
                    exc.message += f" Custom voices: {', '.join(custom)}."
                    exc.args = (exc.message,)
                raise exc from None
        return VoicePreset(name=record.id, description=record.description(), custom=True)

    def voices(self, include_custom: bool = True) -> list[VoiceInfo]:
        """The presets, and (`include_custom`) the custom voices, whose names are often a person's."""
        presets = [VoiceInfo(id=p.name, name=p.name, description=p.description) for p in self._voices.presets.values()]
        if not include_custom:
            return presets
        return presets + [
            VoiceInfo(id=v.id, name=v.name, description=v.description()) for v in self._store.voices().values()
        ]

    # --- the custom-voice store -----------------------------------------------------------------------

    def _taken_names(self) -> set[str]:
        return {n.casefold() for n in [*self._voices.presets, *self._voices.aliases]}

    @_errors_as_values
    def check_new_voice(self, name: str, consent: str) -> None | APIError:
        """Before a sample is decoded: the consent exists, the name is free and there is room."""
        self._store.check_new_voice(name, consent, self._taken_names())
        return None

    @_errors_as_values
    def add_voice(
        self, record: VoiceRecord, sample: np.ndarray, codes: np.ndarray, codes_tag: str
    ) -> VoiceRecord | APIError:
        return self._store.add_voice(record, sample, codes, codes_tag, self._taken_names())

    @_errors_as_values
    def custom_voice(self, voice_id: str) -> VoiceRecord | APIError:
        record = self._store.voices().get(voice_id)
        if record is None:
            raise NotFoundError(f"No custom voice with id '{voice_id}'.", param="voice_id", code="voice_not_found")
        return record

    @_errors_as_values
    def delete_voice(self, voice_id: str) -> None | APIError:
        self._store.delete_voice(voice_id)
        self._prompts.pop(voice_id, None)
        return None

    @_errors_as_values
    def add_consent(self, name: str, language: str, recording: np.ndarray) -> ConsentRecord | APIError:
        return self._store.add_consent(name, language, recording)

    @_errors_as_values
    def consent(self, consent_id: str) -> ConsentRecord | APIError:
        return self._store.consent(consent_id)

    @_errors_as_values
    def consent_page(self, limit: int, after: Optional[str]) -> tuple[list[ConsentRecord], bool] | APIError:
        return self._store.page(limit, after)

    @_errors_as_values
    def rename_consent(self, consent_id: str, name: str) -> ConsentRecord | APIError:
        return self._store.rename_consent(consent_id, name)

    @_errors_as_values
    def delete_consent(self, consent_id: str) -> None | APIError:
        self._store.delete_consent(consent_id)
        return None
