"""One request's generation state while it shares the batch with others.

Everything that belongs to a request and not to the batch lives here: its text chunks and their context,
its PRNG key, its sampling settings, its stop rules (end-of-speech or its own frame cap), its frame groups,
its Mimi streaming state and its output. The scheduler only moves frames in and out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional, Protocol

import mlx.core as mx
import numpy as np

from serve_app.core.constants import LOGGER_NAME
from serve_app.core.messages import END, SynthesisRequest, Usage, Utterance
from serve_app.engine.codec import MimiDecodeState
from serve_app.engine.guards import ChunkGuard
from serve_app.engine.prefix import State, caches_from, token_key
from serve_app.engine.prompts import MAX_POSITIONS, Tokens, fit_context

if TYPE_CHECKING:
    from serve_app.core.messages import ContextSegment, VoiceParams
    from serve_app.engine.codec import MimiDecoder
    from serve_app.engine.options import EngineOptions
    from serve_app.engine.prefix import PrefixCache

logger = logging.getLogger(LOGGER_NAME)


class SessionEngine(Protocol):
    """The part of the engine a session reads (CSMEngine is one): the settings and sizes, how a prompt is
    tokenised, Mimi's decoder and the voices' prefix cache. The model, the tokenizer and the voice store are
    not a session's business; tests/unit/test_engine_views.py holds the module to this list."""

    options: EngineOptions
    vocab_size: int
    num_codebooks: int
    quantizer_bins: int
    mimi_decoder: MimiDecoder
    prefixes: PrefixCache

    def fixed_context(self, preset: VoiceParams, voice_prompt: Optional[ContextSegment] = None) -> list[Tokens]: ...

    def segment_tokens(self, segment: ContextSegment) -> Tokens: ...

    def text_tokens(self, text: str, speaker: int) -> Tokens: ...

    def segment_codes(self, speaker: int, text: str, codes: np.ndarray) -> Tokens: ...

    def frame_cap(self, text: str) -> int: ...


class SpeechSession:
    """Turns the frames the batch computes for this request into PCM groups, chunk after chunk.

    `post` receives PCM bytes (s16le, 24 kHz mono) as each group is decoded, then one `Usage`.
    """

    def __init__(
        self,
        engine: SessionEngine,
        request: SynthesisRequest,
        post: Callable[[Any], None],
        cancelled: Callable[[], bool] = lambda: False,
    ):
        self.engine, self.request, self.post, self.cancelled = engine, request, post, cancelled
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(7), "little")
        self._seed = seed
        self._key = mx.random.key(seed)
        self._key_before = self._key
        preset = request.preset
        self._gain = 10.0 ** (preset.gain_db / 20.0)
        self.inv_temperature = 1.0 / preset.temperature
        self.top_k = max(1, min(preset.top_k, engine.vocab_size))
        self._fixed = engine.fixed_context(preset, request.voice_prompt)
        self._reuse = engine.options.prefix_cache
        self._fixed_key = (
            token_key(np.concatenate([s.ids for s in self._fixed]), np.concatenate([s.mask for s in self._fixed]))
            if self._fixed and self._reuse
            else None
        )
        self._resume: Optional[State] = None  # this request's cache row after its last chunk
        self.prefill = None  # the scheduler's PendingPrefill while this chunk's prompt goes in
        self._last_frame: Optional[np.ndarray] = None  # the frame that ended the last chunk
        # Everything after the voice's prompt, oldest first: the conversation's earlier turns (the request's
        # context), then this request's earlier chunks; a chunk keeps the most recent of them that fit.
        self._history: list = [engine.segment_tokens(segment) for segment in request.context]
        self._said: list[np.ndarray] = []  # every chunk's frames (K, T), for the Utterance when remembered
        self.mimi = MimiDecodeState(engine.mimi_decoder)
        self._flush_due = False  # a group (or a chunk's last frames) is ready for Mimi
        self.usage = Usage()
        self._chunk_index = 0
        self._chunk_text = ""
        self._max_frames = 0
        self._prompt_length = 0
        self._frames: list[np.ndarray] = []
        self._pending: list[np.ndarray] = []
        self._group = engine.options.first_group_frames
        # The guards against CSM's failure modes (guards.py), chunk by chunk.
        self.guard = ChunkGuard(engine.options.guards, engine.options.first_group_frames, self._fired)
        self._chunk_over = False
        self._reprefill = False  # the cache row has seen frames the chunk's history left out
        self.gone = False  # ended (cancelled or failed) while a frame of it may still be in flight

    @property
    def context_length(self) -> int:
        """Backbone positions this request holds now (its share of the batch's memory)."""
        return self._prompt_length + len(self._frames)

    def next_prompt(self) -> Optional[tuple[mx.array, mx.array, Optional[list]]]:
        """Start the next text chunk: its prompt as (tokens, mask) of shape (1, n, K+1) and the cache to
        continue from (None: from nothing), or None when every chunk is done.

        CSM's context for a chunk is the voice's clip, then the conversation's earlier turns and this request's
        earlier chunks (each its text, its frames and the all-zero end-of-speech row), then this chunk's text.
        With KV reuse, a later chunk continues its own cache row, which already holds all of that but the tail
        of the previous chunk; when the row would not fit CSM's positions with this chunk, or on the first
        chunk, the context is trimmed to what fits and prefilled, starting from the voice's cached prefix
        when it has one."""
        retrying = self.guard.retrying
        if self._chunk_index >= len(self.request.chunks) and not retrying:
            return None
        engine = self.engine
        if retrying:  # the same chunk again, with the request's next seed
            self._key = mx.random.key(self._seed + self.guard.next_take())
        else:
            self._chunk_index += 1
        chunk = self.request.chunks[self._chunk_index - 1]
        text = engine.text_tokens(chunk, self.request.preset.speaker)
        max_frames = self.request.max_frames_per_chunk or engine.frame_cap(chunk)
        self._max_frames = min(max_frames, MAX_POSITIONS - len(text) - 1)
        self._chunk_text, self._frames = chunk, []
        if not retrying:
            self.usage.input_tokens += len(text)
        self.guard.start_chunk(chunk, first=self._chunk_index == 1)
        self._chunk_over, self._reprefill = False, False
        resume, self._resume = self._resume, None
        if resume is not None:
            tail_ids, tail_mask = self._tail()
            seen = resume[0][0].shape[2]
            if seen + len(tail_ids) + len(text) + self._max_frames <= MAX_POSITIONS:
                return self._prompt([tail_ids, text.ids], [tail_mask, text.mask], caches_from(resume), seen)
        context = fit_context(self._fixed, self._history, MAX_POSITIONS - len(text) - self._max_frames)
        cache, seen = None, 0
        fixed = len(self._fixed)
        # The cached prefix applies only when every fixed segment made it into the context, in order.
        if (
            self._fixed_key is not None
            and len(context) >= fixed
            and all(a is b for a, b in zip(context[:fixed], self._fixed))
        ):
            cache = engine.prefixes.lookup(self._fixed_key)
            if cache is not None:
                context, seen = context[fixed:], cache[0].offset
        if self._chunk_index == 1 and not retrying:
            self.usage.context_positions = seen + sum(len(segment) for segment in context)
        return self._prompt([s.ids for s in context] + [text.ids], [s.mask for s in context] + [text.mask], cache, seen)

    def _prompt(self, ids: list[np.ndarray], mask: list[np.ndarray], cache: Optional[list], seen: int):
        rows, masks = np.concatenate(ids), np.concatenate(mask)
        self._prompt_length = seen + len(rows)
        return mx.array(rows)[None], mx.array(masks)[None], cache

    def _tail(self) -> tuple[np.ndarray, np.ndarray]:
        """What the cache row has not seen of the previous chunk: its last frame when the frame cap cut it
        (sampled, never fed back), then CSM's all-zero end-of-speech row (which is the frame itself when
        the model ended the chunk)."""
        frames = [self._last_frame] if self._last_frame is not None and self._last_frame.any() else []
        rows = np.zeros((len(frames) + 1, self.engine.num_codebooks + 1), dtype=np.int32)
        if frames:
            rows[0, :-1] = frames[0]
        mask = np.zeros_like(rows, dtype=bool)
        mask[:, :-1] = True
        return rows, mask

    def keep_row(self, state: State) -> None:
        """The scheduler hands over this request's cache row as its chunk ends; kept if another chunk
        follows and KV reuse is on."""
        if self._reuse and not self._reprefill and self._chunk_index < len(self.request.chunks):
            self._resume = state

    @property
    def last_frame_in_flight(self) -> bool:
        """With one frame computed and not yet read, whether that frame is this chunk's last by its cap."""
        return len(self._frames) + 1 >= self._max_frames

    @property
    def key(self) -> mx.array:
        """This request's PRNG key for its next frame: its noise is its own, whoever shares its batch."""
        return self._key

    def advance(self, key: mx.array) -> None:
        """The key after a frame's draw (the frame splits it)."""
        self._key_before, self._key = self._key, key

    @property
    def first_audio_in_flight(self) -> bool:
        """With one frame computed and not yet read, whether that frame completes this request's first group
        (its first audio): the scheduler reads it before launching another, so first audio does not wait
        for a launch (on MLX's CPU backend a launch computes the frame)."""
        done, first = self.usage.output_tokens, self.guard.first_audio
        return done < first and (done + 1 >= first or self.last_frame_in_flight)

    def rewind(self) -> None:
        """Forget the last draw: its frame was speculative and is discarded (the chunk ended before it),
        so the next chunk's first frame draws what it would have drawn without the speculation."""
        self._key = self._key_before

    def accept(self, codes: np.ndarray) -> bool:
        """Take this request's new frame (K,); False when its chunk has ended (end-of-speech, the frame cap,
        or a guard: its silent tail, a loop, an end too early for its text)."""
        if self.guard.stop is not None:  # the silent tail decided on the last group's PCM: this frame is not heard
            self._last_frame, self._reprefill = None, True
            self._end_chunk()
            return False
        if not codes.any():  # CSM's all-zero end-of-speech frame
            if self.guard.too_early(len(self._frames)):  # nothing of the chunk heard yet, and far too early
                return self._too_short(codes)
            self._last_frame = codes
            self._end_chunk()
            return False
        self._frames.append(codes)
        self._pending.append(codes)
        self.usage.output_tokens += 1
        if len(self._pending) >= self._group:
            self._flush_due = True
        if self.guard.looping(codes) or len(self._frames) >= self._max_frames:
            self._last_frame = codes
            self._end_chunk()
            return False
        return True

    def _too_short(self, end: np.ndarray) -> bool:
        """An end-of-speech far too early for the chunk's text, nothing of the chunk heard yet: the first
        time, the chunk is generated again with the request's next seed; the second, the longer take stays."""
        take, self._frames, self._pending, self._flush_due = self._frames, [], [], False
        self.usage.output_tokens -= len(take)
        self._reprefill = True  # the next prompt (this chunk again, or the next) starts from the history
        earlier = self.guard.retry(take)
        if earlier is None:
            self._chunk_over = True
            return False
        self._reprefill = len(earlier) > len(take)  # else the cache row holds exactly this take
        kept = earlier if self._reprefill else take
        self._frames, self._pending = list(kept), list(kept)
        self.usage.output_tokens += len(kept)
        self._last_frame = end
        self._end_chunk()
        return False

    def _fired(self, guard: str) -> None:
        self.usage.guards[guard] = self.usage.guards.get(guard, 0) + 1
        logger.info(
            "guard %s fired: request=%s chunk=%d frame=%d seed=%d",
            guard,
            self.request.request_id or "-",
            self._chunk_index,
            len(self._frames),
            self._seed + self.guard.retries,
        )

    def finish(self) -> None:
        frames, dropped = self.guard.end_of_request()
        self._post_frames(frames)
        self.usage.output_tokens -= dropped  # Usage counts the audio delivered
        if self.request.remember:
            codes = np.concatenate(self._said, axis=1) if self._said else np.zeros((self.engine.num_codebooks, 0))
            text = " ".join(self.request.chunks)
            self.post(Utterance(self.request.preset.name, self.request.preset.speaker, text, codes.astype(np.int16)))
        self.post(self.usage)

    def close(self, error: Optional[BaseException] = None) -> None:
        """Leave for good (cancelled, or failed with `error`): whatever is still in flight is ignored."""
        self.gone = True
        self.post(error if error is not None else END)

    def take_group(self) -> Optional[np.ndarray]:
        """The frames to decode now (K, T), clipped to Mimi's codes, when a group is full or the chunk ended
        with frames pending; else None. The scheduler decodes the groups of a step together (codec.py)."""
        if not (self._flush_due and self._pending):
            return None
        if self.guard.holding(len(self._frames), self._chunk_over):
            return None  # held back: the chunk may yet end too early and be generated again
        if len(self._pending) >= self._group:
            self._group = self.engine.options.group_frames
        bins = self.engine.quantizer_bins
        codes = np.minimum(np.stack(self._pending, axis=1), bins - 1)
        self._pending, self._flush_due = [], False
        return codes

    def post_pcm(self, pcm: np.ndarray) -> None:
        """A decoded group, through the silence guard (which may hold some of it back), then the voice's gain."""
        frames, tail = self.guard.shape(pcm)
        self._post_frames(frames)
        if tail and not self._chunk_over:  # else it ended at this frame anyway, its history taken as it was
            del self._frames[len(self._frames) - tail :]  # the history is what was heard

    def _post_frames(self, frames: list[np.ndarray]) -> None:
        if frames:
            pcm = np.concatenate(frames) * self._gain
            self.post((np.clip(pcm, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())

    def _end_chunk(self) -> None:
        self._flush_due, self._chunk_over = True, True
        self.guard.end_chunk()
        if self._frames:
            codes = np.stack(self._frames, axis=1)
            self._said.append(codes)
            self._history.append(self.engine.segment_codes(self.request.preset.speaker, self._chunk_text, codes))
