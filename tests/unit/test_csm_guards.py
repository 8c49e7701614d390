"""The guards' decisions on their own (engine/guards.py): loops on codebook 0, the silent tail and the seams
on PCM energy, the too-short threshold, terminal punctuation; and the property that random, non-degenerate
streams never trigger them."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.core.constants import SAMPLES_PER_FRAME
from serve_app.core.settings import Settings
from serve_app.engine.guards import FADE_SAMPLES, LoopDetector, SilenceShaper, too_short_frames
from serve_app.engine.options import EngineOptions
from serve_app.text.chunking import with_terminal_punctuation

# The defaults (Settings): a 2 s loop window, -45 dBFS, a 1.5 s tail, a 0.4 s pause.
CONFIG = EngineOptions.from_settings(Settings()).guards
assert (CONFIG.loop_window_frames, CONFIG.silence_dbfs, CONFIG.tail_frames, CONFIG.pause_frames) == (25, -45, 19, 5)


def frames(kind: str, n: int, seed: int = 0) -> np.ndarray:
    """n frames of speech-like noise (-15 dBFS) or of near silence (-70 dBFS)."""
    level = {"loud": 0.25, "quiet": 0.0004}[kind]
    return (np.random.default_rng(seed).standard_normal(n * SAMPLES_PER_FRAME) * level).astype(np.float32)


def shaped(shaper: SilenceShaper, *groups: np.ndarray) -> np.ndarray:
    out = [f for group in groups for f in shaper.feed(group)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def loop_fires_at(ids) -> int | None:
    detector = LoopDetector(25)
    return next((i + 1 for i, x in enumerate(ids) if detector.push(x)), None)


def test_a_loop_is_found_when_its_window_has_repeated():
    for period in (1, 3, 25):
        start = 10
        ids = [1000 + i for i in range(start)] + [7 + (i % period) for i in range(80)]
        # The frames from `start` repeat with `period`: the window is full once `period + 25` of them are in.
        assert loop_fires_at(ids) == start + period + 25


def test_a_repeat_shorter_than_the_window_is_no_loop():
    ids = [1000 + i for i in range(10)] + [5] * 24 + [2000 + i for i in range(40)]
    assert loop_fires_at(ids) is None


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 2051))
def test_random_codebook_streams_are_no_loop(seed, vocabulary):
    """Random ids (from as few as 2 values) repeat a whole 2 s window only by chance: at most 2^-25."""
    ids = np.random.default_rng(seed).integers(0, vocabulary, 400)
    assert loop_fires_at(ids) is None


def test_speech_passes_unchanged_and_a_pause_inside_a_chunk_stays():
    shaper = SilenceShaper(CONFIG)
    audio = [frames("loud", 6, 1), frames("quiet", 10, 2), frames("loud", 6, 3)]
    out = shaped(shaper, *audio)
    assert np.array_equal(out, np.concatenate(audio)) and not shaper.fired and shaper.dropped_frames == 0


def test_a_silent_tail_ends_the_chunk_and_keeps_a_short_faded_pause():
    shaper = SilenceShaper(CONFIG)
    speech, tail = frames("loud", 8, 1), frames("quiet", 24, 2)
    out = shaped(shaper, speech, tail[: 6 * SAMPLES_PER_FRAME], tail[6 * SAMPLES_PER_FRAME :])
    assert shaper.fired
    assert len(out) == (8 + 5) * SAMPLES_PER_FRAME  # speech, then 0.4 s of the tail
    assert np.array_equal(out[:-SAMPLES_PER_FRAME], np.concatenate([speech, tail[: 4 * SAMPLES_PER_FRAME]]))
    assert out[-1] == 0.0 and np.abs(out[-FADE_SAMPLES:]).max() < np.abs(tail[: 5 * SAMPLES_PER_FRAME]).max()
    assert shaper.dropped_frames == 24 - 5 and shaper.tail_dropped == 24 - 5
    assert shaped(shaper, frames("loud", 6, 4)).size == 0  # nothing more of this chunk is played


def test_the_first_chunks_leading_silence_is_the_models():
    shaper = SilenceShaper(CONFIG)
    audio = [frames("quiet", 30, 1), frames("loud", 6, 2)]
    assert np.array_equal(shaped(shaper, *audio), np.concatenate(audio)) and not shaper.fired


def test_the_pause_between_chunks_is_one_pause_of_at_most_the_limit():
    shaper = SilenceShaper(CONFIG)
    first = shaped(shaper, frames("loud", 6, 1), frames("quiet", 4, 2))
    assert len(first) == 6 * SAMPLES_PER_FRAME  # the trailing quiet frames wait for the next chunk
    shaper.end_of_chunk()
    second_speech = frames("loud", 6, 4)
    second = shaped(shaper, frames("quiet", 7, 3), second_speech)
    # 4 + 7 quiet frames at the seam, 5 kept (faded out at the cut, the speech faded in after it).
    assert len(second) == (5 + 6) * SAMPLES_PER_FRAME
    assert second[5 * SAMPLES_PER_FRAME - 1] == 0.0 and second[5 * SAMPLES_PER_FRAME] == 0.0
    assert np.array_equal(second[-5 * SAMPLES_PER_FRAME :], second_speech[-5 * SAMPLES_PER_FRAME :])
    assert shaper.dropped_frames == 4 + 7 - 5


def test_a_short_seam_and_the_final_pause():
    shaper = SilenceShaper(CONFIG)
    quiet = frames("quiet", 2, 2)
    shaped(shaper, frames("loud", 6, 1), quiet)
    shaper.end_of_chunk()
    out = shaped(shaper, frames("loud", 1, 3))
    assert np.array_equal(out[: 2 * SAMPLES_PER_FRAME], quiet)  # a seam under the limit is untouched
    shaped(shaper, frames("quiet", 9, 4))
    assert len(np.concatenate(shaper.end_of_request())) == 5 * SAMPLES_PER_FRAME  # the end keeps 0.4 s


def test_off_means_untouched():
    shaper = SilenceShaper(dataclasses.replace(CONFIG, silent_tail=False))
    audio = [frames("loud", 6, 1), frames("quiet", 40, 2)]
    out = np.concatenate([shaped(shaper, *audio), *shaper.end_of_request()])
    assert np.array_equal(out, np.concatenate(audio)) and not shaper.fired


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 18)), min_size=1, max_size=8))
def test_pauses_under_the_limit_never_fire(runs):
    """Speech with pauses shorter than the silent tail: every frame comes out, unchanged, in order."""
    shaper = SilenceShaper(CONFIG)
    kinds = [kind for loud, quiet in runs for kind in (("loud", loud), ("quiet", quiet))]
    audio = [frames(kind, n, i) for i, (kind, n) in enumerate(kinds)]
    audio.append(frames("loud", 1, 99))
    assert np.array_equal(shaped(shaper, *audio), np.concatenate(audio)) and not shaper.fired


def test_too_short_is_a_third_of_a_slow_reading():
    assert too_short_frames("") == 1
    assert too_short_frames("x" * 30) == 13  # 30 chars at 10/s is 3 s; a third is 1 s = 12.5 frames
    assert too_short_frames("x" * 200) == 84


def test_terminal_punctuation():
    cases = {
        "Hello there": "Hello there.",
        "Hello there,": "Hello there.",
        "wait —": "wait.",
        "Done.": "Done.",
        "Really?!": "Really?!",
        '"Quoted"': '"Quoted."',
        "(aside)": "(aside.)",
        "日本語です": "日本語です。",
        "안녕하세요": "안녕하세요.",
        "***": "***",
    }
    assert {text: with_terminal_punctuation(text) for text in cases} == cases
