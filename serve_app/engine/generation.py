"""The CSM generation loop: text chunks in, 24 kHz PCM out, streamed in small groups of frames.

We reuse mlx-audio's model math (SesameModel's backbone/decoder/embeddings, Mimi and its streaming decoder,
the top-k sampler) and own the loop around it, because mlx-audio's `Model.generate` keeps caches and the
random state on shared objects, fetches voice prompts from the hub, and only yields after whole groups of
a chunk. Everything here runs on the replica's one MLX thread (see worker.py).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import mlx.core as mx
import numpy as np
from mlx_audio.lm.models.cache import make_prompt_cache
from mlx_audio.lm.sample_utils import apply_top_k

from ..protocol import Usage
from ..settings import FRAME_RATE, SAMPLE_RATE, Settings
from ..voices import VoiceLibrary, VoicePreset
from .memory import MemoryGuard
from .checkpoint import CheckpointFiles, ModelLoadError, TextTokenizer, load_csm, load_mimi, resolve_checkpoint

logger = logging.getLogger("sesame_tts")

MAX_POSITIONS = 2048  # CSM's backbone context (and its RoPE table)


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


def sample_top_k(logits: mx.array, temperature: float, top_k: int, key: mx.array) -> mx.array:
    """One token per row from the top-k of `logits`, with an explicit PRNG key (so a seed is per request)."""
    logits = logits.astype(mx.float32)
    if top_k < logits.shape[-1]:
        logits = apply_top_k(logits, top_k)
    return mx.random.categorical(logits * (1.0 / temperature), key=key)


class CSMEngine:
    """A loaded CSM checkpoint (backbone + depth decoder + Mimi) that streams speech for text chunks."""

    def __init__(self, model, mimi, tokenizer: TextTokenizer, settings: Settings, files: Optional[CheckpointFiles] = None):
        from mlx_audio.codec.models.mimi import MimiStreamingDecoder

        self.model = model
        self.mimi = mimi
        self.tokenizer = tokenizer
        self.settings = settings
        self.files = files
        self.num_codebooks = model.args.audio_num_codebooks
        self._decoder = MimiStreamingDecoder(mimi)
        self._prompts: dict[str, _Tokens] = {}
        self.memory = MemoryGuard(settings.mlx_memory_limit_mb)

    @classmethod
    def load(cls, settings: Settings, voices: Optional[VoiceLibrary] = None) -> "CSMEngine":
        started = time.perf_counter()
        MemoryGuard(settings.mlx_memory_limit_mb).install()
        files = resolve_checkpoint(settings)
        engine = cls(load_csm(files, settings.dtype), load_mimi(files), TextTokenizer(files.tokenizer_dir), settings, files)
        if voices is not None:
            engine.load_voice_prompts(voices)
        logger.info("loaded %s in %.1f s (%s, %s)", files.root, time.perf_counter() - started, settings.dtype, mx.default_device())
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
            self._prompts[preset.name] = self._segment_tokens(segment)
            logger.info("voice %s: prompt %s, %d positions", preset.name, path.name, len(self._prompts[preset.name]))

    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        """Mimi codes (codebooks x frames) of float32 mono 24 kHz audio."""
        codes = self.mimi.encode(mx.array(audio, dtype=mx.float32)[None, None, :])[0]
        return np.array(codes[: self.num_codebooks], dtype=np.int32)

    def _text_tokens(self, text: str, speaker: int) -> _Tokens:
        ids = self.tokenizer.encode(f"[{speaker}]{text}")
        rows = np.zeros((len(ids), self.num_codebooks + 1), dtype=np.int32)
        mask = np.zeros_like(rows, dtype=bool)
        rows[:, -1] = ids
        mask[:, -1] = True
        return _Tokens(rows, mask)

    def _segment_tokens(self, segment: ContextSegment) -> _Tokens:
        """Text rows, then audio rows ending in CSM's all-zero end-of-speech frame."""
        codes = segment.codes if segment.codes is not None else self.encode_audio(segment.audio)
        audio = np.zeros((codes.shape[1] + 1, self.num_codebooks + 1), dtype=np.int32)
        audio[:-1, :-1] = codes.T
        mask = np.zeros_like(audio, dtype=bool)
        mask[:, :-1] = True
        text = self._text_tokens(segment.text, segment.speaker)
        return _Tokens(np.concatenate([text.ids, audio]), np.concatenate([text.mask, mask]))

    @staticmethod
    def _fit_context(fixed: list[_Tokens], history: list[_Tokens], budget: int) -> list[_Tokens]:
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
        """A short generation, so the first request does not pay for first-call kernel setup."""
        preset = VoicePreset(name="warm-up", description="warm-up")
        frames = self.settings.first_group_frames + 1
        for _ in self.synthesize(SynthesisRequest(["Hello."], preset, seed=0, max_frames_per_chunk=frames)):
            pass

    # --- generation -----------------------------------------------------------------------------------

    def _frame(self, tokens: mx.array, mask: mx.array, cache, key: mx.array, temperature: float, top_k: int) -> mx.array:
        """One 80 ms frame: the backbone step, then the depth decoder over the remaining codebooks."""
        m = self.model
        h = (m._embed_tokens(tokens) * mx.expand_dims(mask, -1)).sum(axis=2)
        last = m.backbone(h, cache=cache)[:, -1, :]
        keys = mx.random.split(key, self.num_codebooks)
        sample = sample_top_k(m.codebook0_head(last), temperature, top_k, keys[0])
        samples = [sample]
        curr = mx.concatenate([mx.expand_dims(last, 1), m._embed_audio(0, sample[:, None])], axis=1)
        decoder_cache = make_prompt_cache(m.decoder)
        for i in range(1, self.num_codebooks):
            out = m.decoder(m.projection(curr), cache=decoder_cache)
            sample = sample_top_k(out[:, -1, :] @ m.audio_head[i - 1], temperature, top_k, keys[i])
            samples.append(sample)
            curr = m._embed_audio(i, sample[:, None])
        return mx.stack(samples, axis=1)

    def _decode(self, frames: list[np.ndarray], gain: float) -> bytes:
        """Mimi-decode frames (continuing this request's stream state) into s16le PCM bytes."""
        bins = self.mimi.cfg.quantizer_bins
        codes = mx.array(np.minimum(np.stack(frames, axis=1), bins - 1))[None]
        pcm = np.array(self._decoder.decode_frames(codes)[0, 0], dtype=np.float32)
        return (np.clip(pcm * gain, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()

    def synthesize(self, request: SynthesisRequest, cancelled: Callable[[], bool] = lambda: False) -> Iterator[bytes | Usage]:
        """Yield PCM (s16le, 24 kHz, mono) as soon as each group of frames is decoded, then a `Usage`.

        Each text chunk after the first sees the earlier chunks (text and generated codes) as context, so
        the voice carries across a long input. `cancelled` is checked before every frame.
        """
        preset, settings = request.preset, self.settings
        key = mx.random.key(request.seed if request.seed is not None else int.from_bytes(os.urandom(7), "little"))
        gain = 10.0 ** (preset.gain_db / 20.0)
        fixed = [self._prompts[preset.name]] if preset.name in self._prompts else []
        fixed += [self._segment_tokens(seg) for seg in request.context]
        history: list[_Tokens] = []
        usage = Usage()
        group = settings.first_group_frames
        self._decoder.reset()
        self.memory.begin_request()
        try:
            for chunk in request.chunks:
                text = self._text_tokens(chunk, preset.speaker)
                max_frames = request.max_frames_per_chunk or max_frames_for(chunk, settings)
                max_frames = min(max_frames, MAX_POSITIONS - len(text) - 1)
                context = self._fit_context(fixed, history, MAX_POSITIONS - len(text) - max_frames)
                ids = np.concatenate([seg.ids for seg in context] + [text.ids])
                mask = np.concatenate([seg.mask for seg in context] + [text.mask])
                tokens, tokens_mask = mx.array(ids)[None], mx.array(mask)[None]
                cache = make_prompt_cache(self.model.backbone)
                usage.input_tokens += len(text)
                frames: list[np.ndarray] = []
                pending: list[np.ndarray] = []
                for _ in range(max_frames):
                    if cancelled():
                        return
                    self.memory.check()
                    key, subkey = mx.random.split(key)
                    codes = np.array(self._frame(tokens, tokens_mask, cache, subkey, preset.temperature, preset.top_k))[0]
                    if not codes.any():
                        break  # CSM's end-of-speech frame
                    frames.append(codes)
                    pending.append(codes)
                    usage.output_tokens += 1
                    if len(pending) >= group:
                        yield self._decode(pending, gain)
                        pending, group = [], settings.group_frames
                    next_row = np.zeros((1, 1, self.num_codebooks + 1), dtype=np.int32)
                    next_row[0, 0, :-1] = codes
                    tokens = mx.array(next_row)
                    tokens_mask = mx.array(np.concatenate([np.ones(self.num_codebooks, bool), [False]])[None, None])
                if pending:
                    yield self._decode(pending, gain)
                if frames:
                    history.append(self._segment_tokens(ContextSegment(preset.speaker, chunk, codes=np.stack(frames, axis=1))))
            yield usage
        except Exception as exc:
            translated = MemoryGuard.translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        finally:
            mx.clear_cache()  # also after a failure: the next request starts with MLX's cache released

