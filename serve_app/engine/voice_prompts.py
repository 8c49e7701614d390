"""Where the engine's voice prompts come from, as a callback interface: the engine knows CSM, not folders.

The model replica hands the engine a `VoiceSource` (model/loading.py adapts the preset library and the
custom-voice store to it): the presets' reference clips, already resolved to files, and the custom voices'
stored transcripts and Mimi codes. The engine encodes what has no codes yet and gives the source the codes
back to keep, so a clip is encoded once per Mimi checkpoint on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import numpy as np


@dataclass
class PresetClip:
    """A preset's reference prompt: the voice, its speaker id, the clip's transcript and its audio file."""

    name: str
    speaker: int
    text: str
    path: Path


@dataclass
class StoredVoice:
    """A custom voice as stored: its transcript, a label for the log, and its Mimi codes when this Mimi
    (`codes_tag`) made them before, else the sample (float32 24 kHz mono) to encode."""

    transcript: str
    label: str
    codes: Optional[np.ndarray]
    sample: Optional[np.ndarray]


class VoiceSource(Protocol):
    def preset_clips(self, checkpoint_root: Path) -> list[PresetClip]:
        """Every preset that has a reference prompt (raises ModelLoadError naming a broken one)."""

    def custom_voice_ids(self) -> list[str]:
        """The stored custom voices, to load at start."""

    def custom_voice(self, voice_id: str, codes_tag: str) -> StoredVoice:
        """One stored custom voice (raises NotFoundError if it is gone)."""

    def save_custom_codes(self, voice_id: str, codes_tag: str, codes: np.ndarray) -> None:
        """Keep the codes this Mimi made of a custom voice's sample."""
