"""The CSM generation loop: text chunks in, 24 kHz PCM out, streamed in small groups of frames.

We reuse mlx-audio's model math (SesameModel's backbone/decoder/embeddings, Mimi and its streaming decoder,
the top-k sampler) and own the loop around it, because mlx-audio's `Model.generate` keeps caches and the
random state on shared objects, fetches voice prompts from the hub, and only yields after whole groups of
a chunk. Everything here runs on the replica's one MLX thread (see worker.py).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import mlx.core as mx
import numpy as np

from ..protocol import Usage
from ..settings import FRAME_RATE, SAMPLE_RATE, Settings
from ..voices import VoiceLibrary, VoicePreset
from .batch import FrameDecoder
from .codec import stateful_modules
from .memory import MemoryGuard
from .checkpoint import CheckpointFiles, ModelLoadError, TextTokenizer, load_csm, load_mimi, quantize, resolve_checkpoint

logger = logging.getLogger("sesame_tts")


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
        self.memory = MemoryGuard(settings.mlx_memory_limit_mb)

    @classmethod
    def load(cls, settings: Settings, voices: Optional[VoiceLibrary] = None) -> "CSMEngine":
        started = time.perf_counter()
        MemoryGuard(settings.mlx_memory_limit_mb).install()
        files = resolve_checkpoint(settings)
        model = load_csm(files, settings.dtype)
        if settings.quantize:
            quantize(model, settings.quantize)
        engine = cls(model, load_mimi(files), TextTokenizer(files.tokenizer_dir), settings, files)
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
            self._prompts[preset.name] = self.segment_tokens(segment)
            logger.info("voice %s: prompt %s, %d positions", preset.name, path.name, len(self._prompts[preset.name]))

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

    def warm_up(self) -> None:
        """Short generations, so requests do not pay for first-call kernel setup; with a compiled frame
        decoder, one per batch size up to MAX_BATCH_SIZE (it compiles once per shape)."""
        from .scheduler import GenerationJob, run_jobs

        preset = VoicePreset(name="warm-up", description="warm-up")
        frames = self.settings.first_group_frames + 1
        sizes = range(1, self.settings.max_batch_size + 1) if self.frame_decoder.compiled else (1,)
        items: list = []
        for size in sizes:
            jobs = [GenerationJob(SynthesisRequest(["Hello."], preset, seed=i, max_frames_per_chunk=frames), items.append)
                    for i in range(size)]
            run_jobs(self, jobs, max_batch=size)
        failures = [item for item in items if isinstance(item, BaseException)]
        if failures:
            raise failures[0]

    # --- generation -----------------------------------------------------------------------------------

    def synthesize(self, request: SynthesisRequest, cancelled: Callable[[], bool] = lambda: False) -> Iterator[bytes | Usage]:
        """One request on the calling thread (in-process use): PCM (s16le, 24 kHz, mono) as each group of
        frames is decoded, then a `Usage`. The server batches requests instead (scheduler.py)."""
        from .scheduler import synthesize

        return synthesize(self, request, cancelled)
