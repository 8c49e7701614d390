"""The loaded CSM engine: checkpoint, voice prompts and CSM's token layout.

We reuse mlx-audio's model math (SesameModel's backbone/decoder/embeddings, Mimi and its streaming decoder)
and own the loop around it, because mlx-audio's `Model.generate` keeps caches and the random state on
shared objects, fetches voice prompts from the hub, and only yields after whole groups of a chunk. The loop
itself is the batch scheduler (scheduler.py, session.py; the token layout is prompts.py's), driven by the
replica's one MLX thread (worker.py) or, in-process, by runners.py.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from serve_app.core.constants import LOGGER_NAME, SAMPLE_RATE
from serve_app.core.errors import InvalidRequestError, ModelLoadError
from serve_app.core.messages import ContextSegment, VoiceParams
from serve_app.engine.checkpoint import (
    CheckpointFiles,
    TextTokenizer,
    load_csm,
    load_mimi,
    quantize,
    resolve_checkpoint,
)
from serve_app.engine.codec import MimiDecoder, StagedEncode
from serve_app.engine.frame import FrameStep
from serve_app.engine.hub import DownloadProgress
from serve_app.engine.mlx_memory import MemoryLimit
from serve_app.engine.options import EngineOptions
from serve_app.engine.prefix import PrefixCache
from serve_app.engine.prompts import MAX_POSITIONS, Tokens, audio_rows, concat, text_rows
from serve_app.engine.voice_prompts import VoiceSource

logger = logging.getLogger(LOGGER_NAME)


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


class CSMEngine:
    """A loaded CSM checkpoint (backbone + depth decoder + Mimi) that streams speech for text chunks."""

    def __init__(
        self,
        model,
        mimi,
        tokenizer: TextTokenizer,
        options: EngineOptions,
        files: Optional[CheckpointFiles] = None,
        voices: Optional[VoiceSource] = None,
    ):
        self.model = model
        self.mimi = mimi
        self.tokenizer = tokenizer
        self.options = options
        self.voices = voices
        self.files = files
        self.num_codebooks = model.args.audio_num_codebooks
        self.vocab_size = model.args.audio_vocab_size
        self.quantizer_bins = mimi.cfg.quantizer_bins  # Mimi's codebook size: codes above it are clipped
        compiled = options.mlx_compile == "on" or (options.mlx_compile == "auto" and mx.default_device() == mx.gpu)
        self.frame_step = FrameStep(model, compiled)
        self.mimi_decoder = MimiDecoder(mimi, compiled)
        self._mimi_streams: dict[int, mx.Stream] = {}
        self._prompts: dict[str, Tokens] = {}
        self._codes_tag: Optional[str] = None
        self.prefixes = PrefixCache(options.voice_cache_mb if options.prefix_cache else 0)
        self.memory = MemoryLimit(options.mlx_memory_limit_mb)

    @classmethod
    def load(
        cls, options: EngineOptions, voices: Optional[VoiceSource] = None, progress: Optional[DownloadProgress] = None
    ) -> CSMEngine:
        """Find (or download once, reporting to `progress`) and load the checkpoint, then encode the voices'
        prompts (`voices`: the presets' clips and the stored custom voices; none without it)."""
        started = time.perf_counter()
        MemoryLimit(options.mlx_memory_limit_mb).install()
        files = resolve_checkpoint(options, progress)
        model = load_csm(files, options.dtype)
        if options.quantize:
            quantize(model, options.quantize)
        mimi = load_mimi(files, options.mimi_dtype)
        engine = cls(model, mimi, TextTokenizer(files.tokenizer_dir), options, files, voices)
        if voices is not None:
            engine.load_voice_prompts(voices)
            engine.load_custom_voices()
        logger.info(
            "loaded %s in %.1f s (%s%s, %s)",
            files.root,
            time.perf_counter() - started,
            options.dtype,
            f", {options.quantize}-bit" if options.quantize else "",
            mx.default_device(),
        )
        return engine

    @property
    def mimi_stream(self) -> mx.Stream:
        """Mimi's own MLX stream: its decodes queue apart from the frames, so reading a group's PCM does not
        wait for the frame launched after it. MLX streams belong to the thread that made them: one per
        thread that decodes (the replica's MLX thread; in-process runs may use others)."""
        thread = threading.get_ident()
        if thread not in self._mimi_streams:
            self._mimi_streams[thread] = mx.new_stream(mx.default_device())
        return self._mimi_streams[thread]

    # --- prompts and tokens ---------------------------------------------------------------------------

    def load_voice_prompts(self, voices: VoiceSource) -> None:
        """Encode every preset's reference clip with Mimi once, at load (a clip shared by presets once)."""
        from mlx_audio.utils import load_audio

        codes_by_path: dict[Path, np.ndarray] = {}
        for clip in voices.preset_clips(self.files.root):
            try:
                if clip.path not in codes_by_path:
                    audio = np.array(load_audio(str(clip.path), sample_rate=SAMPLE_RATE), dtype=np.float32)
                    codes_by_path[clip.path] = self.encode_audio(audio)
            except Exception as exc:
                raise ModelLoadError(f"voice '{clip.name}' prompt.audio: {exc}") from None
            tokens = self.segment_tokens(ContextSegment(clip.speaker, clip.text, codes=codes_by_path[clip.path]))
            problem = self.overflow(tokens)
            if problem:
                raise ModelLoadError(f"voice '{clip.name}' prompt.audio {clip.path}: {problem}")
            self._add_prompt(clip.name, tokens, clip.path.name)

    def _add_prompt(self, name: str, tokens: Tokens, source: str) -> None:
        self._prompts[name] = tokens
        cached = self.options.prefix_cache and self.prefixes.add(self.model, tokens.ids, tokens.mask)
        logger.info(
            "voice %s: prompt %s, %d positions%s", name, source, len(tokens), ", prefilled once" if cached else ""
        )

    def overflow(self, tokens: Tokens) -> Optional[str]:
        """Why a voice prompt cannot be used (it and the longest text chunk pass CSM's positions), or None."""
        room = self.longest_chunk_positions()
        if len(tokens) + room <= MAX_POSITIONS:
            return None
        return (
            f"the clip and its transcript take {len(tokens)} positions and a text chunk up to {room} more, over "
            f"CSM's {MAX_POSITIONS}; use a shorter clip (about {(MAX_POSITIONS - room) / 12.5 * 0.8:.0f} s at most)"
        )

    # --- custom voices (voices/store.py): encoded once, stored, loaded on any replica when first used ---

    @property
    def codes_tag(self) -> str:
        """Which Mimi made a clip's codes: its weights file (name, size, first MiB), dtype and codebooks."""
        if self._codes_tag is None:
            digest = hashlib.sha256(f"{self.options.mimi_dtype}:{self.num_codebooks}".encode())
            if self.files is not None:
                path = self.files.mimi_weights
                digest.update(f"{path.name}:{path.stat().st_size}".encode())
                with open(path, "rb") as src:
                    digest.update(src.read(1 << 20))
            self._codes_tag = digest.hexdigest()[:16]
        return self._codes_tag

    def start_custom_voice_encode(self, audio: np.ndarray) -> StagedEncode:
        """A new custom voice's encode, to run a step at a time between batch steps (codec.StagedEncode)."""
        return StagedEncode(self.mimi, audio)

    def finish_custom_voice(self, encode: StagedEncode, transcript: Optional[str]) -> np.ndarray:
        """The voice's Mimi codes, once its clip (and transcript) are known to fit CSM's context."""
        codes = np.array(encode.codes()[: self.num_codebooks], dtype=np.int32)
        problem = self.overflow(self.segment_codes(0, transcript or "", codes))
        if problem:
            raise InvalidRequestError(
                f"The voice sample is too long for CSM: {problem}.", param="audio_sample", code="audio_too_long"
            )
        return codes

    def load_custom_voices(self) -> None:
        """Every stored custom voice, at load; one that cannot be read is logged and skipped (the rest serve)."""
        for voice_id in self.voices.custom_voice_ids():
            try:
                self.load_custom_voice(voice_id)
            except Exception as exc:
                logger.warning("custom voice %s not loaded: %s", voice_id, exc)

    def load_custom_voice(self, voice_id: str) -> None:
        """A stored custom voice's prompt (and its prefilled prefix); encodes the clip only if this Mimi has
        not before (a changed checkpoint)."""
        if self.voices is None:
            raise InvalidRequestError(
                f"Voice '{voice_id}' is not available on this replica.", param="voice", code="invalid_voice"
            )
        stored = self.voices.custom_voice(voice_id, self.codes_tag)
        codes = stored.codes
        if codes is None:
            codes = self.encode_audio(stored.sample)
            self.voices.save_custom_codes(voice_id, self.codes_tag, codes)
        self.add_custom_prompt(voice_id, stored.transcript, codes, stored.label)

    def add_custom_prompt(self, voice_id: str, transcript: str, codes: np.ndarray, source: str) -> None:
        tokens = self.segment_codes(0, transcript, codes)
        problem = self.overflow(tokens)  # stored under other chunk settings, say
        if problem:
            raise InvalidRequestError(
                f"Voice '{voice_id}' cannot be used with this server's settings: {problem}.",
                param="voice",
                code="invalid_voice",
            )
        self._add_prompt(voice_id, tokens, source)

    def forget_voice(self, voice_id: str) -> None:
        tokens = self._prompts.pop(voice_id, None)
        if tokens is not None:
            self.prefixes.remove(tokens.ids, tokens.mask)

    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        """Mimi codes (codebooks x frames) of float32 mono 24 kHz audio."""
        codes = self.mimi.encode(mx.array(audio, dtype=mx.float32)[None, None, :])[0]
        return np.array(codes[: self.num_codebooks], dtype=np.int32)

    def text_tokens(self, text: str, speaker: int) -> Tokens:
        return text_rows(self.tokenizer.encode(f"[{speaker}]{text}"), self.num_codebooks)

    def segment_codes(self, speaker: int, text: str, codes: np.ndarray) -> Tokens:
        """An utterance already in Mimi codes (K x frames) as context rows."""
        return self.segment_tokens(ContextSegment(speaker, text, codes=codes))

    def fixed_context(self, preset: VoiceParams, voice_prompt: Optional[ContextSegment] = None) -> list[Tokens]:
        """What every chunk of a request sees first, whatever else must give way: the voice's prompt. A custom
        voice not seen here yet comes from the request (`voice_prompt`) when its codes are this Mimi's (their
        `codes_tag`), else from this machine's store, which encodes its kept clip again for this Mimi. (The
        conversation's turns and the request's earlier chunks follow it, the most recent that fit.)"""
        if preset.custom and preset.name not in self._prompts:
            sent = voice_prompt if voice_prompt is not None and voice_prompt.codes is not None else None
            if sent is not None and sent.codes_tag == self.codes_tag:
                self.add_custom_prompt(preset.name, sent.text, sent.codes, "the request")
            else:
                try:
                    self.load_custom_voice(preset.name)
                except InvalidRequestError:
                    if sent is None:
                        raise
                    raise InvalidRequestError(
                        f"Voice '{preset.name}' was made with another Mimi codec than this model's, and its clip is "
                        "not on this machine to encode again: create the voice again on this server.",
                        param="voice",
                        code="invalid_voice",
                    ) from None
        return [self._prompts[preset.name]] if preset.name in self._prompts else []

    def frame_cap(self, text: str) -> int:
        return self.options.max_frames_for(text)

    def longest_chunk_positions(self) -> int:
        """Positions the longest text chunk may need besides its context: every character a token (the
        worst case), BOS/EOS and the speaker tag, and its frame cap."""
        chars = self.options.chunk_max_chars
        return chars + 8 + self.options.max_frames_for("x" * chars)

    def segment_tokens(self, segment: ContextSegment) -> Tokens:
        """Text rows, then audio rows ending in CSM's all-zero end-of-speech frame (prompts.py)."""
        codes = segment.codes if segment.codes is not None else self.encode_audio(segment.audio)
        return concat(self.text_tokens(segment.text, segment.speaker), audio_rows(codes))
