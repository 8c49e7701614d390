"""One request's generation state while it shares the batch with others.

Everything that belongs to a request and not to the batch lives here: its text chunks and their context,
its PRNG key, its sampling settings, its stop rules (end-of-speech or its own frame cap), its frame groups,
its Mimi streaming state and its output. The scheduler only moves frames in and out.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Optional

import mlx.core as mx
import numpy as np

from ..protocol import Usage
from .codec import MimiStream
from .request import SynthesisRequest

if TYPE_CHECKING:
    from .generation import CSMEngine

MAX_POSITIONS = 2048  # CSM's backbone context (and its RoPE table)


class SpeechSession:
    """Turns the frames the batch computes for this request into PCM groups, chunk after chunk.

    `post` receives PCM bytes (s16le, 24 kHz mono) as each group is decoded, then one `Usage`.
    """

    def __init__(self, engine: "CSMEngine", request: SynthesisRequest, post: Callable[[Any], None],
                 cancelled: Callable[[], bool] = lambda: False):
        self.engine, self.request, self.post, self.cancelled = engine, request, post, cancelled
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(7), "little")
        self._key = mx.random.key(seed)
        preset = request.preset
        self._gain = 10.0 ** (preset.gain_db / 20.0)
        self.inv_temperature = 1.0 / preset.temperature
        self.top_k = max(1, min(preset.top_k, engine.vocab_size))
        self._fixed = engine.fixed_context(preset, request.context)
        self._history: list = []
        self._mimi = MimiStream(engine.mimi, engine.mimi_modules)
        self.usage = Usage()
        self._chunk_index = 0
        self._chunk_text = ""
        self._max_frames = 0
        self._prompt_length = 0
        self._frames: list[np.ndarray] = []
        self._pending: list[np.ndarray] = []
        self._group = engine.settings.first_group_frames

    @property
    def context_length(self) -> int:
        """Backbone positions this request holds now (its share of the batch's memory)."""
        return self._prompt_length + len(self._frames)

    def next_prompt(self) -> Optional[tuple[mx.array, mx.array]]:
        """Start the next text chunk: its prompt as (tokens, mask) of shape (1, n, K+1), or None when
        every chunk is done."""
        if self._chunk_index >= len(self.request.chunks):
            return None
        engine, chunk = self.engine, self.request.chunks[self._chunk_index]
        self._chunk_index += 1
        text = engine.text_tokens(chunk, self.request.preset.speaker)
        max_frames = self.request.max_frames_per_chunk or engine.frame_cap(chunk)
        self._max_frames = min(max_frames, MAX_POSITIONS - len(text) - 1)
        context = engine.fit_context(self._fixed, self._history, MAX_POSITIONS - len(text) - self._max_frames)
        ids = np.concatenate([seg.ids for seg in context] + [text.ids])
        mask = np.concatenate([seg.mask for seg in context] + [text.mask])
        self._chunk_text, self._frames, self._prompt_length = chunk, [], len(ids)
        self.usage.input_tokens += len(text)
        return mx.array(ids)[None], mx.array(mask)[None]

    def noise(self) -> mx.array:
        """Gumbel noise for this request's next frame (K, V), from its own key: a request samples the same
        values whichever requests share its batch."""
        self._key, subkey = mx.random.split(self._key)
        return mx.random.gumbel(shape=(self.engine.num_codebooks, self.engine.vocab_size), key=subkey)

    def accept(self, codes: np.ndarray) -> bool:
        """Take this request's new frame (K,); False when its chunk has ended (end-of-speech or cap)."""
        if not codes.any():  # CSM's all-zero end-of-speech frame
            self._end_chunk()
            return False
        self._frames.append(codes)
        self._pending.append(codes)
        self.usage.output_tokens += 1
        if len(self._pending) >= self._group:
            self._flush()
            self._group = self.engine.settings.group_frames
        if len(self._frames) >= self._max_frames:
            self._end_chunk()
            return False
        return True

    def finish(self) -> None:
        self.post(self.usage)

    def _flush(self) -> None:
        if self._pending:
            bins = self.engine.mimi.cfg.quantizer_bins
            pcm = self._mimi.decode(np.minimum(np.stack(self._pending, axis=1), bins - 1))
            self._pending = []
            self.post((np.clip(pcm * self._gain, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())

    def _end_chunk(self) -> None:
        self._flush()
        if self._frames:
            codes = np.stack(self._frames, axis=1)
            self._history.append(self.engine.segment_codes(self.request.preset.speaker, self._chunk_text, codes))
