"""Loading the engine for the model replica: its options from the settings, and its voices as the engine
asks for them (engine/voice_prompts.VoiceSource): the preset library's reference clips resolved against the
voices folder or the checkpoint, and this machine's custom-voice store."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serve_app.core.errors import ModelLoadError
from serve_app.core.settings import ConfigError, Settings
from serve_app.engine.voice_prompts import PresetClip, StoredVoice
from serve_app.voices.presets import VoiceLibrary
from serve_app.voices.store import CustomVoiceStore


class ReplicaVoices:
    def __init__(self, settings: Settings, presets: VoiceLibrary):
        self._voices_dir = settings.voices_dir
        self._presets = presets
        self._store = CustomVoiceStore(settings)

    def preset_clips(self, checkpoint_root: Path) -> list[PresetClip]:
        clips = []
        for preset in self._presets.presets.values():
            if preset.prompt is None:
                continue
            try:
                path = preset.prompt.resolve(self._voices_dir, checkpoint_root)
            except ConfigError as exc:
                raise ModelLoadError(f"voice '{preset.name}' prompt.audio: {exc}") from None
            clips.append(PresetClip(preset.name, preset.speaker, preset.prompt.text, path))
        return clips

    def custom_voice_ids(self) -> list[str]:
        return list(self._store.voices())

    def custom_voice(self, voice_id: str, codes_tag: str) -> StoredVoice:
        record, codes, sample = self._store.codes(voice_id, codes_tag)
        return StoredVoice(record.transcript or "", f"custom '{record.name}'", codes, sample)

    def save_custom_codes(self, voice_id: str, codes_tag: str, codes: np.ndarray) -> None:
        self._store.save_codes(voice_id, codes_tag, codes)


def load_engine(settings: Settings, presets: VoiceLibrary | None = None, progress=None):
    """A CSM engine for these settings, with the presets' prompts and the stored custom voices (none
    without `presets`). Imports MLX: call it where MLX may run (the model replica's thread, tools, tests)."""
    from serve_app.engine.csm import CSMEngine
    from serve_app.engine.options import EngineOptions

    source = ReplicaVoices(settings, presets) if presets is not None else None
    return CSMEngine.load(EngineOptions.from_settings(settings), source, progress=progress)
