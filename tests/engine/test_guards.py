"""The guards against CSM's failure modes on the real frame loop (tiny checkpoint): each driven by forced
codes or forced quiet PCM, each firing once at the frame it should, with its usage field and log line; the
retried chunk is the next seed's; normal generation never triggers one.

Random weights never end a chunk, loop or fall silent by themselves, so the tests force it: codes at the
depth decoder's output (as the frame-loop tests force an end-of-speech), and, for the silent tail, the PCM
at Mimi's output (the tiny Mimi decodes every code to noise near -5 dBFS, so no code sequence is quiet)."""

from __future__ import annotations

import dataclasses
import logging
import subprocess

import numpy as np
import pytest

from serve_app.audio.ffmpeg import ffmpeg_command, find_ffmpeg
from serve_app.core.constants import SAMPLES_PER_FRAME
from serve_app.core.messages import END, SynthesisRequest, Usage, Utterance
from serve_app.engine.scheduler import BatchScheduler, GenerationJob
from tests.support.audio import decode_format, rms
from tests.support.forcing import end_of_speech_at, force_codes, quiet_frames

CHUNKS = ["Hello there, how are you?", "Second chunk."]
FRAME_BYTES = SAMPLES_PER_FRAME * 2


def run(engine, voices, chunks, seed, frames, pipelined=True, remember=False):
    """One request alone: everything it posted (PCM pieces, Utterance, Usage, END)."""
    scheduler = BatchScheduler(engine, 1, pipelined=pipelined)
    posts: list = []
    request = SynthesisRequest(
        chunks, voices.resolve("fast"), seed=seed, max_frames_per_chunk=frames, remember=remember
    )
    scheduler.add(GenerationJob(request, posts.append))
    while scheduler.active:
        scheduler.step()
    assert posts[-1] is END
    return posts


def pcm_of(posts) -> bytes:
    return b"".join(p for p in posts if isinstance(p, bytes))


def usage_of(posts) -> Usage:
    return next(p for p in posts if isinstance(p, Usage))


def without(engine, monkeypatch, **options) -> None:
    monkeypatch.setattr(engine, "options", dataclasses.replace(engine.options, **options))


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "unpipelined"])
def test_a_loop_on_codebook_0_ends_the_chunk(engine, voices, monkeypatch, caplog, pipelined):
    """Codebook 0 distinct for 10 frames, then repeating with period 3: the 2 s window (25 frames) is full
    of repeats at frame 10 + 3 + 25, where the chunk ends (the frame cap, 60, is far)."""

    def change(call, codes):
        codes[:, 0] = 1000 + call if call <= 10 else 7 + call % 3
        return codes

    force_codes(engine, monkeypatch, change)
    with caplog.at_level(logging.INFO, logger="sesame_tts"):
        posts = run(engine, voices, CHUNKS[:1], 3, 60, pipelined=pipelined)
    usage = usage_of(posts)
    assert usage.output_tokens == 38 and len(pcm_of(posts)) == 38 * FRAME_BYTES
    assert usage.guards == {"loop": 1}
    assert [r.getMessage() for r in caplog.records if "guard" in r.getMessage()] == [
        "guard loop fired: request=- chunk=1 frame=38 seed=3"
    ]


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "unpipelined"])
@pytest.mark.slow("generates long enough for a guard to act (or not)")
def test_a_silent_tail_ends_the_chunk_and_the_next_one_follows_a_short_pause(engine, voices, monkeypatch, pipelined):
    """Speech for 8 frames, then quiet: Mimi decodes groups of 2, 6, 6, ...; the 19th quiet frame (1.5 s) is
    frame 26, in the group 26..31, so the chunk ends at its next frame. What is heard: the 8 frames of speech
    and 5 of the quiet ones (0.4 s, faded out); then the second chunk, whole (its 40-frame cap)."""
    reference = run(engine, voices, CHUNKS[:1], 5, 16, pipelined=pipelined)  # its first 8 frames are compared
    quiet_frames(monkeypatch, 8, 32)
    posts = run(engine, voices, CHUNKS, 5, 40, pipelined=pipelined, remember=True)
    usage, pcm = usage_of(posts), pcm_of(posts)
    assert usage.guards == {"silent_tail": 1}
    assert usage.output_tokens == 13 + 40 and len(pcm) == (13 + 40) * FRAME_BYTES
    assert pcm[: 8 * FRAME_BYTES] == pcm_of(reference)[: 8 * FRAME_BYTES]
    samples = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768
    pause = samples[8 * SAMPLES_PER_FRAME : 13 * SAMPLES_PER_FRAME]
    assert rms(pause) < 1e-2 < rms(samples[13 * SAMPLES_PER_FRAME :]) and pause[-1] == 0.0
    # What CSM keeps as this chunk's history (and the utterance memory) is what was heard of it.
    utterance = next(p for p in posts if isinstance(p, Utterance))
    assert utterance.codes.shape == (engine.num_codebooks, 13 + 40)


@pytest.mark.slow("generates long enough for a guard to act (or not)")
def test_a_guard_that_ends_a_chunk_mid_stream_leaves_a_valid_container(engine, voices, monkeypatch):
    """The PCM pieces as the encoder gets them, streamed into ffmpeg: mp3 and opus decode whole."""
    quiet_frames(monkeypatch, 8, 32)
    pieces = [p for p in run(engine, voices, CHUNKS, 5, 40) if isinstance(p, bytes)]
    ffmpeg, _ = find_ffmpeg("ffmpeg")
    for fmt in ("mp3", "opus"):
        proc = subprocess.Popen(ffmpeg_command(ffmpeg, fmt), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for piece in pieces:
            proc.stdin.write(piece)
        proc.stdin.close()
        data = proc.stdout.read()
        assert proc.wait() == 0
        samples, rate = decode_format(data, fmt)
        assert rate in (24000, 48000)
        assert abs(len(samples) / 24000 - 53 * 0.08) < 0.1, fmt
        assert rms(samples[-20 * SAMPLES_PER_FRAME :]) > 0.05  # the second chunk's speech is all there


def test_an_end_at_frame_0_is_generated_again_with_the_next_seed(engine, voices, monkeypatch, caplog):
    expected = run(engine, voices, CHUNKS[:1], 12, 20)
    end_of_speech_at(engine, monkeypatch, 1)
    with caplog.at_level(logging.INFO, logger="sesame_tts"):
        posts = run(engine, voices, CHUNKS[:1], 11, 20)
    assert pcm_of(posts) == pcm_of(expected)
    usage, plain = usage_of(posts), usage_of(expected)
    assert (
        (usage.input_tokens, usage.output_tokens)
        == (plain.input_tokens, plain.output_tokens)
        == (
            plain.input_tokens,
            20,
        )
    )
    assert usage.guards == {"empty": 1} and plain.guards == {}
    assert "guard empty fired: request=- chunk=1 frame=0 seed=11" in caplog.text


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "unpipelined"])
def test_an_early_end_of_a_later_chunk_is_generated_again(engine, voices, monkeypatch, pipelined):
    """The second chunk ("Second chunk.", 13 characters: too short under 6 frames) ends after 3 frames: it
    is generated again (frames held back until then, so nothing of the short take is heard)."""
    reference = run(engine, voices, CHUNKS, 21, 8, pipelined=pipelined)
    end_of_speech_at(engine, monkeypatch, 12)  # chunk 1 is frames 1-8 (its cap), chunk 2's 4th frame is call 12
    posts = run(engine, voices, CHUNKS, 21, 8, pipelined=pipelined)
    usage = usage_of(posts)
    assert usage.guards == {"too_short": 1} and usage.output_tokens == 16
    pcm = pcm_of(posts)
    assert len(pcm) == 16 * FRAME_BYTES and pcm[: 8 * FRAME_BYTES] == pcm_of(reference)[: 8 * FRAME_BYTES]
    assert pcm != pcm_of(reference)  # the retry draws with the next seed
    monkeypatch.undo()
    end_of_speech_at(engine, monkeypatch, 12)
    assert pcm_of(run(engine, voices, CHUNKS, 21, 8, pipelined=pipelined)) == pcm  # deterministic


def test_of_two_short_takes_the_longer_is_kept(engine, voices, monkeypatch):
    """Both takes of chunk 2 end early (after 3 frames, then after 1): the first is kept, exactly as it
    sounds with the guard off."""
    end_of_speech_at(engine, monkeypatch, 12, 15)  # the retry's 2nd frame is call 15 (13 was speculative)
    posts = run(engine, voices, CHUNKS, 21, 8)
    usage = usage_of(posts)
    assert usage.guards == {"too_short": 1} and usage.output_tokens == 8 + 3
    monkeypatch.undo()
    end_of_speech_at(engine, monkeypatch, 12)
    without(engine, monkeypatch, guard_too_short=False)
    off = run(engine, voices, CHUNKS, 21, 8)
    assert usage_of(off).guards == {} and usage_of(off).output_tokens == 8 + 3
    assert pcm_of(posts) == pcm_of(off)


@pytest.mark.slow("generates long enough for a guard to act (or not)")
def test_normal_generation_never_triggers_a_guard(engine, voices):
    """Every voice, several seeds, two chunks to their frame caps: no guard acts, nothing is trimmed."""
    for seed, voice in enumerate(["fast", "conversational", "professional", "whisper"]):
        scheduler = BatchScheduler(engine, 2)
        posts: list = []
        request = SynthesisRequest(CHUNKS, voices.resolve(voice), seed=seed)
        scheduler.add(GenerationJob(request, posts.append))
        while scheduler.active:
            scheduler.step()
        usage = usage_of(posts)
        assert usage.guards == {}
        assert len(pcm_of(posts)) == usage.output_tokens * FRAME_BYTES
        assert usage.output_tokens == sum(engine.frame_cap(chunk) for chunk in CHUNKS)
