"""The loaded CSM engine: checkpoint, voice prompts and CSM's token layout.

We reuse mlx-audio's model math (SesameModel's backbone/decoder/embeddings, Mimi and its streaming decoder)
and own the loop around it, because mlx-audio's `Model.generate` keeps caches and the random state on
shared objects, fetches voice prompts from the hub, and only yields after whole groups of a chunk. The loop
itself is the batch scheduler (scheduler.py, session.py), driven by the replica's one MLX thread
(worker.py) or, in-process, by runners.py.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from ..settings import FRAME_RATE, SAMPLE_RATE, Settings
from ..voices import VoiceLibrary, VoicePreset
from .batch import FrameDecoder
from .codec import stateful_modules
from .memory import MemoryGuard
from .request import ContextSegment
from ..errors import ModelLoadError
from .checkpoint import CheckpointFiles, TextTokenizer, load_csm, load_mimi, quantize, resolve_checkpoint
from .hub import DownloadProgress
from .prefix import PrefixCache
from .session import MAX_POSITIONS

logger = logging.getLogger("sesame_tts")


@dataclass
class _Tokens:
    """A segment as CSM input rows: (n, K+1) token ids and the matching boolean mask."""

    ids: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def select_device(choice: str) -> mx.DeviceType:
    """The MLX device for this replica: the GPU (Metal or CUDA) where MLX has one, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not mx.is_available(mx.gpu)):
        return mx.cpu
    if not mx.is_available(mx.gpu):
        raise RuntimeError("MLX_DEVICE=gpu but this MLX build has no GPU backend (install mlx[cuda] or run on a Mac)")
    return mx.gpu


def describe_device(device: mx.DeviceType) -> str:
    """'cpu', 'gpu (metal)' or 'gpu (cuda)'."""
    if device != mx.gpu:
        return "cpu"
    return "gpu (metal)" if mx.metal.is_available() else "gpu (cuda)"


def max_frames_for(text: str, settings: Settings) -> int:
    """The runaway guard: the most frames a chunk may take, from its length (random weights never stop)."""
    seconds = settings.max_audio_base_s + settings.max_audio_s_per_char * len(text)
    return max(1, math.ceil(seconds * FRAME_RATE))


class CSMEngine:
    """A loaded CSM checkpoint (backbone + depth decoder + Mimi) that streams speech for text chunks."""

    def __init__(self, model, mimi, tokenizer: TextTokenizer, settings: Settings, files: Optional[CheckpointFiles] = None):
        self.model = model
        self.mimi = mimi
        self.tokenizer = tokenizer
        self.settings = settings
        self.files = files
        self.num_codebooks = model.args.audio_num_codebooks
        self.vocab_size = model.args.audio_vocab_size
        compiled = settings.mlx_compile == "on" or (settings.mlx_compile == "auto" and mx.default_device() == mx.gpu)
        self.frame_decoder = FrameDecoder(model, compiled)
        self.mimi_modules = stateful_modules(mimi)
        self._prompts: dict[str, _Tokens] = {}
        self.prefixes = PrefixCache(settings.voice_cache_mb if settings.prefix_cache else 0)
        self.memory = MemoryGuard(settings.mlx_memory_limit_mb)

    @classmethod
    def load(cls, settings: Settings, voices: Optional[VoiceLibrary] = None,
             progress: Optional[DownloadProgress] = None) -> "CSMEngine":
        """Find (or download once, reporting to `progress`) and load the checkpoint, then encode the voices."""
        started = time.perf_counter()
        MemoryGuard(settings.mlx_memory_limit_mb).install()
        files = resolve_checkpoint(settings, progress)
        model = load_csm(files, settings.dtype)
        if settings.quantize:
            quantize(model, settings.quantize)
        engine = cls(model, load_mimi(files, settings.mimi_dtype), TextTokenizer(files.tokenizer_dir), settings, files)
        if voices is not None:
            engine.load_voice_prompts(voices)
        logger.info("loaded %s in %.1f s (%s%s, %s)", files.root, time.perf_counter() - started, settings.dtype,
                    f", {settings.quantize}-bit" if settings.quantize else "", mx.default_device())
        return engine

    # --- prompts and tokens ---------------------------------------------------------------------------

    def load_voice_prompts(self, voices: VoiceLibrary) -> None:
        """Encode every preset's reference clip with Mimi once, at load (a clip shared by presets once)."""
        from mlx_audio.utils import load_audio

        codes_by_path: dict[Path, np.ndarray] = {}
        for preset in voices.presets.values():
            if preset.prompt is None:
                continue
            try:
                path = preset.prompt.resolve(self.settings.voices_dir, self.files.root)
                if path not in codes_by_path:
                    audio = np.array(load_audio(str(path), sample_rate=SAMPLE_RATE), dtype=np.float32)
                    codes_by_path[path] = self.encode_audio(audio)
            except Exception as exc:
                raise ModelLoadError(f"voice '{preset.name}' prompt.audio: {exc}") from None
            segment = ContextSegment(preset.speaker, preset.prompt.text, codes=codes_by_path[path])
            tokens = self.segment_tokens(segment)
            room = self.longest_chunk_positions()
            if len(tokens) + room > MAX_POSITIONS:
                raise ModelLoadError(
                    f"voice '{preset.name}' prompt.audio {path}: the clip and its transcript take {len(tokens)} "
                    f"positions and a text chunk up to {room} more, over CSM's {MAX_POSITIONS}; use a shorter clip "
                    f"(about {(MAX_POSITIONS - room) / 12.5 * 0.8:.0f} s at most)")
            self._prompts[preset.name] = tokens
            cached = self.settings.prefix_cache and self.prefixes.add(self.model, tokens.ids, tokens.mask)
            logger.info("voice %s: prompt %s, %d positions%s", preset.name, path.name, len(tokens),
                        ", prefilled once" if cached else "")

    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        """Mimi codes (codebooks x frames) of float32 mono 24 kHz audio."""
        codes = self.mimi.encode(mx.array(audio, dtype=mx.float32)[None, None, :])[0]
        return np.array(codes[: self.num_codebooks], dtype=np.int32)

    def text_tokens(self, text: str, speaker: int) -> _Tokens:
        ids = self.tokenizer.encode(f"[{speaker}]{text}")
        rows = np.zeros((len(ids), self.num_codebooks + 1), dtype=np.int32)
        mask = np.zeros_like(rows, dtype=bool)
        rows[:, -1] = ids
        mask[:, -1] = True
        return _Tokens(rows, mask)

    def segment_codes(self, speaker: int, text: str, codes: np.ndarray) -> _Tokens:
        """An utterance already in Mimi codes (K x frames) as context rows."""
        return self.segment_tokens(ContextSegment(speaker, text, codes=codes))

    def fixed_context(self, preset: VoicePreset, context: list[ContextSegment]) -> list[_Tokens]:
        """What every chunk of a request sees first: the voice's prompt, then the given conversation."""
        fixed = [self._prompts[preset.name]] if preset.name in self._prompts else []
        return fixed + [self.segment_tokens(seg) for seg in context]

    def frame_cap(self, text: str) -> int:
        return max_frames_for(text, self.settings)

    def longest_chunk_positions(self) -> int:
        """Positions the longest text chunk may need besides its context: every character a token (the
        worst case), BOS/EOS and the speaker tag, and its frame cap."""
        chars = self.settings.chunk_max_chars
        return chars + 8 + max_frames_for("x" * chars, self.settings)

    def segment_tokens(self, segment: ContextSegment) -> _Tokens:
        """Text rows, then audio rows ending in CSM's all-zero end-of-speech frame."""
        codes = segment.codes if segment.codes is not None else self.encode_audio(segment.audio)
        audio = np.zeros((codes.shape[1] + 1, self.num_codebooks + 1), dtype=np.int32)
        audio[:-1, :-1] = codes.T
        mask = np.zeros_like(audio, dtype=bool)
        mask[:, :-1] = True
        text = self.text_tokens(segment.text, segment.speaker)
        return _Tokens(np.concatenate([text.ids, audio]), np.concatenate([text.mask, mask]))

    @staticmethod
    def fit_context(fixed: list[_Tokens], history: list[_Tokens], budget: int) -> list[_Tokens]:
        """The fixed segments (voice prompt, conversation) if they fit, then the most recent history that fits."""
        chosen: list[_Tokens] = []
        used = 0
        for seg in fixed:
            if used + len(seg) <= budget:
                chosen.append(seg)
                used += len(seg)
        recent: list[_Tokens] = []
        for seg in reversed(history):
            if used + len(seg) > budget:
                break
            recent.insert(0, seg)
            used += len(seg)
        return chosen + recent
