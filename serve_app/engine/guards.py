"""Guards against CSM's known ways of going wrong, decided per chunk while it is generated.

With real weights CSM-1B sometimes never says end-of-speech (a chunk runs on as a silent tail or as babble
until the frame cap), loops, or ends far too early (at frame 0, or after a word). These guards act only on
those patterns; a normal utterance passes through them byte for byte:

- `LoopDetector`: codebook 0 (the semantic codebook) of the last `window` frames repeating the frames one
  period before them, for some period up to the window. Codebook 0 is where a loop shows: the acoustic
  codebooks vary a little even when the words repeat exactly.
- `SilenceShaper`: the silent tail and the seams between chunks, decided on the decoded PCM's energy (RMS
  of each 80 ms frame as Mimi decoded it, before the voice's gain, so a quiet preset such as whisper is
  judged as CSM spoke it) rather than on codebook patterns: which codebook-0 ids mean
  silence depends on Mimi's weights (no fixed id can be named), while energy is what the listener hears.
  Once a chunk has spoken, quiet frames are held back; speech resuming releases them unchanged (a pause
  inside a chunk stays as it was); a quiet run reaching `tail_frames` ends the chunk (`silent_tail`) and
  only the first `pause_frames` of it are kept, faded out. Quiet frames at the end of a chunk and at the
  start of the next are one pause: at most `pause_frames` of it are kept (no doubled silence), with a short
  fade at the cut (no click). The first chunk's leading silence is left alone.
- `too_short_frames`: the fewest frames a chunk's text could take at a third of a slow speaking rate; an
  end-of-speech before that is retried once with the request's next seed (session.py).

`ChunkGuard` holds one request's state of all three, chunk by chunk, behind the few calls its session
makes. Numpy only: the engine's session calls these on the host, between frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import numpy as np

from serve_app.core.constants import FRAME_RATE, SAMPLE_RATE, SAMPLES_PER_FRAME, SLOW_CHARS_PER_S

# The names a guard reports under (Usage.guards, the request's log line, the sesame_tts_guards metric).
SILENT_TAIL, LOOP, TOO_SHORT, EMPTY = "silent_tail", "loop", "too_short", "empty"
FADE_SAMPLES = int(0.005 * SAMPLE_RATE)  # 5 ms: long enough to remove a click, too short to hear


def frames_for(seconds: float) -> int:
    return max(1, round(seconds * FRAME_RATE))


def too_short_frames(text: str) -> int:
    """A third of the frames `text` takes at a slow speaking rate: an end-of-speech before this many frames
    is far too early for the text (an end at frame 0 always is)."""
    return max(1, math.ceil(len(text) / SLOW_CHARS_PER_S / 3 * FRAME_RATE))


@dataclass(frozen=True)
class GuardConfig:
    """What the guards do, in frames, from the engine's options (`EngineOptions.guards`; each a setting, whose
    default lives in `Settings` alone; README, "Guards")."""

    loop: bool
    loop_window_frames: int
    silent_tail: bool
    silence_dbfs: float
    tail_frames: int  # a quiet run this long after speech ends the chunk
    pause_frames: int  # of a pause cut short, this much is kept
    too_short: bool
    hold_frames: int  # held back at a chunk's start to allow a retry
    first_chunk_hold_frames: int  # the same in the first chunk (costs first audio)


class LoopDetector:
    """Whether codebook 0 has repeated itself for a whole window: for each period p <= window, how many
    of the newest frames equal the frame p before them (O(window) per frame, no history scan)."""

    def __init__(self, window: int):
        self.window = window
        self._ids: list[int] = []
        self._periods = np.arange(1, window + 1)
        self._runs = np.zeros(window + 1, dtype=np.int64)  # index p: the run for period p (0 unused)

    def push(self, first_codebook_id: int) -> bool:
        """Take the next frame's codebook-0 id; True when the last `window` frames repeat with some period."""
        ids = self._ids
        ids.append(int(first_codebook_id))
        n = len(ids)
        usable = self._periods < n
        same = np.zeros(self.window, dtype=bool)
        same[usable] = np.array(ids[-2::-1][: int(usable.sum())]) == ids[-1]
        self._runs[1:] = np.where(same, self._runs[1:] + 1, 0)
        if n > 2 * self.window:
            del ids[: n - 2 * self.window]
        return bool((self._runs[1:] >= self.window).any())


class SilenceShaper:
    """Shapes one request's PCM (float32, as Mimi decoded it) frame by frame; see the module docstring.

    `feed` returns what may be played now; `fired` says the silent-tail guard has ended this chunk (what
    it would still be given is dropped); `end_of_request` releases what is left of a final pause. Counts
    what it kept back for good in `dropped_frames` (Usage counts audio delivered)."""

    def __init__(self, config: GuardConfig):
        self.config = config
        self._threshold = 10.0 ** (config.silence_dbfs / 10.0)  # of the mean square
        self._held: list[np.ndarray] = []  # quiet frames since the last speech (or since the last chunk's)
        self._spoke = False  # this chunk has spoken
        self._first_chunk = True
        self._pause_kept = 0  # frames of the current pause already played (a silent tail's cut)
        self._fade_in = False  # the next frame played follows a cut
        self.fired = False
        self.dropped_frames = 0
        self.tail_dropped = 0  # of them, the frames of this chunk's silent tail

    def quiet(self, frame: np.ndarray) -> bool:
        return float(np.mean(np.square(frame, dtype=np.float64))) < self._threshold

    def feed(self, pcm: np.ndarray) -> list[np.ndarray]:
        """A decoded group (whole frames) in, what to play now out (in order, possibly nothing)."""
        if not self.config.silent_tail:
            return [pcm]
        out: list[np.ndarray] = []
        for start in range(0, len(pcm), SAMPLES_PER_FRAME):
            frame = pcm[start : start + SAMPLES_PER_FRAME]
            if self.fired:
                self.dropped_frames += 1
                self.tail_dropped += 1
            elif not self.quiet(frame):
                out += self._release(cut=not self._spoke and not self._first_chunk)
                self._spoke, self._pause_kept = True, 0
                out.append(self._faded_in(frame))
            elif not self._spoke and self._first_chunk:
                out.append(frame)  # the first chunk's leading silence is the model's to decide
            else:
                self._held.append(frame)
                if self._spoke and len(self._held) >= self.config.tail_frames:
                    before = self.dropped_frames
                    out += self._release(cut=True)
                    self.fired, self.tail_dropped = True, self.dropped_frames - before
        return out

    def end_of_chunk(self) -> None:
        """A chunk ended: its trailing quiet frames stay held, to join the next chunk's leading ones."""
        self._spoke, self._first_chunk, self.fired, self.tail_dropped = False, False, False, 0

    def end_of_request(self) -> list[np.ndarray]:
        return self._release(cut=True)

    def _release(self, cut: bool) -> list[np.ndarray]:
        """The held quiet frames to play: all of them when speech resumes inside a chunk; at most
        `pause_frames` of a pause (less what of it was played already) at a cut, the last one faded out."""
        held, self._held = self._held, []
        if not cut:
            return held
        keep = max(0, self.config.pause_frames - self._pause_kept)
        kept, dropped = held[:keep], len(held) - min(keep, len(held))
        self._pause_kept += len(kept)
        self.dropped_frames += dropped
        if dropped:
            self._fade_in = True
            if kept:
                kept[-1] = _fade(kept[-1], out=True)
        return kept

    def _faded_in(self, frame: np.ndarray) -> np.ndarray:
        if not self._fade_in:
            return frame
        self._fade_in = False
        return _fade(frame, out=False)


def _fade(frame: np.ndarray, out: bool) -> np.ndarray:
    ramp = np.linspace(1.0, 0.0, FADE_SAMPLES, dtype=np.float32)
    frame = frame.copy()
    if out:
        frame[-FADE_SAMPLES:] *= ramp
    else:
        frame[:FADE_SAMPLES] *= ramp[::-1]
    return frame


class ChunkGuard:
    """One request's guards, chunk by chunk: the loop detector, the silence shaper, the frames held back at a
    chunk's start and a too-short take being generated again. The session keeps the frames, the cache and
    the output; it asks this what to do, and `report(name)` hears each guard that fires."""

    def __init__(self, config: GuardConfig, first_group: int, report: Callable[[str], None]):
        self.config, self._first_group, self._report = config, first_group, report
        self._shaper = SilenceShaper(config)
        self._loop: Optional[LoopDetector] = None
        self.hold = 0  # frames held back (not decoded) at the chunk's start, so a too-early end can be retried
        self.first_audio = first_group  # frames before the request's first PCM goes out
        self.retries = 0  # chunks generated again so far (each with the request's seed + retries)
        self._retry_of: Optional[list[np.ndarray]] = None  # the too-short take being generated again
        self.stop: Optional[str] = None  # a guard ends the chunk at its next frame

    @property
    def retrying(self) -> bool:
        return self._retry_of is not None

    def start_chunk(self, text: str, first: bool) -> None:
        """A chunk (or a take of it again) starts; `first`: the request's first chunk."""
        config = self.config
        if not first:
            self._shaper.end_of_chunk()  # the previous chunk's last PCM has been shaped by now
        self._loop = LoopDetector(config.loop_window_frames) if config.loop else None
        limit = max(self._first_group, config.first_chunk_hold_frames) if first else config.hold_frames
        self.hold = min(too_short_frames(text), limit) if config.too_short else 0
        if first:
            self.first_audio = max(self._first_group, self.hold)
        self.stop = None

    def looping(self, codes: np.ndarray) -> bool:
        """Take a frame (K,); True when codebook 0 has looped for a whole window (the chunk ends)."""
        if self._loop is not None and self._loop.push(codes[0]):
            self._report(LOOP)
            return True
        return False

    def too_early(self, frames: int) -> bool:
        """Whether an end-of-speech after `frames` of the chunk is far too early for its text."""
        return frames < self.hold

    def retry(self, take: list[np.ndarray]) -> Optional[list[np.ndarray]]:
        """A too-early end of `take`: None the first time (generate the chunk again: `retries` counts it when
        the next take starts); the earlier take the second time, for the session to keep the longer one."""
        if self._retry_of is None:
            self._report(EMPTY if not take else TOO_SHORT)
            self._retry_of = take
            return None
        earlier, self._retry_of = self._retry_of, None
        return earlier

    def next_take(self) -> int:
        """The chunk is generated again: its take's number (the request's seed plus it is the take's seed)."""
        self.retries += 1
        return self.retries

    def end_chunk(self) -> None:
        """The chunk ended (whatever ended it): no take of it is being retried any more."""
        self._retry_of = None

    def holding(self, frames: int, chunk_over: bool) -> bool:
        """Whether a full group must wait: the chunk may yet end too early and be generated again."""
        return frames < self.hold and not chunk_over

    def shape(self, pcm: np.ndarray) -> tuple[list[np.ndarray], int]:
        """A decoded group through the silence shaper: (what to play now, how many of the chunk's last frames
        were a silent tail that ended it now: 0 unless the guard just fired)."""
        frames = self._shaper.feed(pcm)
        if self._shaper.fired and self.stop is None:
            self._report(SILENT_TAIL)
            self.stop = SILENT_TAIL  # (reset when the next chunk starts, should this one be over already)
            return frames, self._shaper.tail_dropped
        return frames, 0

    def end_of_request(self) -> tuple[list[np.ndarray], int]:
        """What is left of a final pause to play, and how many frames were kept back for good in all."""
        return self._shaper.end_of_request(), self._shaper.dropped_frames
