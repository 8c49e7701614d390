"""The engine's own view of the configuration: what loading and generating need, and nothing else.

The engine does not read the server's `Settings` (HTTP limits, CORS, voices folders are none of its
business): the model replica builds these options from them once (`from_settings`), and tests and tools
can build them directly. Frozen, so a running engine's options cannot drift.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from pydantic import SecretStr

from serve_app.core.constants import FRAME_RATE
from serve_app.engine.guards import GuardConfig, frames_for

if TYPE_CHECKING:
    from serve_app.core.settings import Settings


@dataclass(frozen=True)
class EngineOptions:
    """Every field is a setting of the same name (README, Configuration); `from_settings` is the one
    constructor the server uses, so defaults and validation live in `Settings` alone."""

    # Where the checkpoint comes from (a hub id, downloaded once into cache_dir, or a local folder).
    model_id: str
    tokenizer_id: str
    mimi_id: str
    mimi_file: str
    cache_dir: Path
    hf_endpoint: Optional[str]
    hf_token: Optional[SecretStr] = dataclasses.field(repr=False)
    # How it runs.
    dtype: str
    mimi_dtype: str
    quantize: int
    mlx_compile: Literal["auto", "on", "off"]
    pipeline: bool
    prefix_cache: bool
    voice_cache_mb: int
    mlx_memory_limit_mb: int
    # The batch and the frame loop.
    max_batch_size: int
    first_group_frames: int
    group_frames: int
    prefill_step_positions: int
    # Text chunks and their frame caps.
    chunk_max_chars: int
    max_audio_base_s: float
    max_audio_s_per_char: float
    # Guards against CSM's failure modes (guards.py).
    guard_loop: bool
    guard_loop_window_s: float
    guard_silent_tail: bool
    guard_silence_dbfs: float
    guard_silent_tail_s: float
    guard_pause_s: float
    guard_too_short: bool
    guard_hold_s: float
    guard_first_chunk_hold_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineOptions:
        """The fields of the same names, from the server's settings."""
        return cls(**{field.name: getattr(settings, field.name) for field in dataclasses.fields(cls)})

    @property
    def guards(self) -> GuardConfig:
        return GuardConfig(
            loop=self.guard_loop,
            loop_window_frames=frames_for(self.guard_loop_window_s),
            silent_tail=self.guard_silent_tail,
            silence_dbfs=self.guard_silence_dbfs,
            tail_frames=frames_for(self.guard_silent_tail_s),
            pause_frames=round(self.guard_pause_s * FRAME_RATE),
            too_short=self.guard_too_short,
            hold_frames=round(self.guard_hold_s * FRAME_RATE),
            first_chunk_hold_frames=round(self.guard_first_chunk_hold_s * FRAME_RATE),
        )

    def max_frames_for(self, text: str) -> int:
        """The runaway guard: the most frames a chunk may take, from its length (random weights never stop)."""
        seconds = self.max_audio_base_s + self.max_audio_s_per_char * len(text)
        return max(1, math.ceil(seconds * FRAME_RATE))
