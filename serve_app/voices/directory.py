"""The voice directory: every voice a request may name, in one place.

It sits over the voices folder's presets (and their aliases, voices/presets.py) and this machine's custom
voices (voices/store.py), and answers what the rest of the server asks of a voice: which one a name means
(`resolve`), which there are (`list`), which names a new custom voice may not take (`taken_names`), what a
custom voice's clip is as CSM context (`prompt`: its transcript and Mimi codes, tagged with the codec that
made them), and the 400 for a name nobody has (`unknown`, built fresh each time). Dialects map their own ids
onto these names before they ask.
"""

from __future__ import annotations

from typing import Optional

from serve_app.core.errors import InvalidRequestError
from serve_app.core.messages import ContextSegment, VoiceInfo
from serve_app.voices.presets import VoiceLibrary, VoicePreset, unknown_voice
from serve_app.voices.store import CustomVoiceStore


class VoiceDirectory:
    def __init__(self, library: VoiceLibrary, store: CustomVoiceStore):
        self.library = library
        self.store = store
        self._prompts: dict[str, ContextSegment] = {}

    def resolve(self, name: str, custom_voices: bool = True) -> VoicePreset:
        """A preset or alias first, then (`custom_voices`) a custom voice by id or name; else `unknown(name)`."""
        preset = self.library.find(name)
        if preset is not None:
            return preset
        record = self.store.find(name) if custom_voices else None
        if record is None:
            raise self.unknown(name, custom_voices)
        return VoicePreset(name=record.id, description=record.description(), custom=True)

    def unknown(self, name: str, custom_voices: bool = True) -> InvalidRequestError:
        """The 400 for `name`, naming the presets, the aliases and (`custom_voices`) the custom voices."""
        custom = [v.name for v in self.store.voices().values()] if custom_voices else []
        return unknown_voice(name, self.library.names(), sorted(self.library.aliases), custom)

    def list(self, include_custom: bool = True) -> list[VoiceInfo]:
        """The presets, and (`include_custom`) the custom voices, whose names are often a person's."""
        presets = [VoiceInfo(id=p.name, name=p.name, description=p.description) for p in self.library.presets.values()]
        if not include_custom:
            return presets
        custom = [VoiceInfo(id=v.id, name=v.name, description=v.description()) for v in self.store.voices().values()]
        return presets + custom

    def taken_names(self) -> set[str]:
        """Every name taken by a preset or an alias, casefolded (a custom voice may not take one)."""
        return {n.casefold() for n in [*self.library.presets, *self.library.aliases]}

    def prompt(self, preset: VoicePreset) -> Optional[ContextSegment]:
        """A custom voice's stored transcript and Mimi codes with the tag of the codec that made them (read
        once: a voice never changes), for a model replica that has not seen the voice; None for a preset or
        a voice that cannot be read. The replica uses the codes only if its own Mimi has that tag."""
        if not preset.custom:
            return None
        if preset.name not in self._prompts:
            stored = self.store.prompt(preset.name)
            if stored is None:
                return None
            transcript, codes, codes_tag = stored
            self._prompts[preset.name] = ContextSegment(0, transcript, codes=codes, codes_tag=codes_tag)
        return self._prompts[preset.name]

    def forget(self, voice_id: str) -> None:
        self._prompts.pop(voice_id, None)
