"""ffmpeg command lines: tempo chains for every speed, and real encodes that start before input ends."""

from __future__ import annotations

import math
import subprocess
import time

import numpy as np
import pytest

from serve_app.audio.ffmpeg import atempo_chain, ffmpeg_command, find_ffmpeg
from serve_app.core.formats import ELEVENLABS_FORMATS, FORMATS, OPENAI_FORMATS
from tests.support.audio import decode, decode_format, duration


@pytest.mark.parametrize(
    "speed,stages",
    [
        (1.0, None),
        (2.0, [2.0]),
        (4.0, [2.0, 2.0]),
        (0.25, [0.5, 0.5]),
        (3.0, [2.0, 1.5]),
        (0.3, [0.5, 0.6]),
        (0.75, [0.75]),
    ],
)
def test_atempo_chain(speed, stages):
    chain = atempo_chain(speed)
    if stages is None:
        assert chain is None
        return
    values = [float(s.split("=")[1]) for s in chain.split(",")]
    assert values == pytest.approx(stages)
    assert all(0.5 <= v <= 2.0 for v in values)
    assert math.prod(values) == pytest.approx(speed)


def _tone(seconds: float) -> bytes:
    t = np.arange(int(24000 * seconds)) / 24000
    return (np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes()


@pytest.mark.parametrize("fmt", sorted(OPENAI_FORMATS))
@pytest.mark.parametrize("speed", [1.0, 4.0, 0.25])
def test_encode_round_trip(fmt, speed):
    ffmpeg, _ = find_ffmpeg("ffmpeg")
    out = subprocess.run(ffmpeg_command(ffmpeg, fmt, speed), input=_tone(1.0), capture_output=True, check=True).stdout
    seconds = duration(decode(out, "pcm" if fmt == "pcm" else None))
    assert seconds == pytest.approx(1.0 / speed, rel=0.12, abs=0.08)


@pytest.mark.parametrize("fmt", sorted(ELEVENLABS_FORMATS))
def test_elevenlabs_formats_resample_to_their_rate(fmt):
    """Every ElevenLabs output format: the declared rate, the tone's length, and the tone still there."""
    ffmpeg, _ = find_ffmpeg("ffmpeg")
    out = subprocess.run(ffmpeg_command(ffmpeg, fmt, 1.25), input=_tone(1.0), capture_output=True, check=True).stdout
    samples, rate = decode_format(out, fmt)
    assert rate == FORMATS[fmt].sample_rate
    assert duration(samples) == pytest.approx(0.8, rel=0.12, abs=0.08)
    assert np.sqrt(np.mean(samples**2)) > 0.1


def test_first_mp3_bytes_come_before_input_ends():
    ffmpeg, _ = find_ffmpeg("ffmpeg")
    proc = subprocess.Popen(ffmpeg_command(ffmpeg, "mp3"), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        proc.stdin.write(_tone(0.5))
        proc.stdin.flush()
        started = time.monotonic()
        first = proc.stdout.read1(65536)  # returns as soon as ffmpeg flushed something
        assert first and time.monotonic() - started < 2.0
    finally:
        proc.kill()
        proc.wait()


def test_mp3_starts_with_an_mpeg_frame_not_a_tag():
    """No ID3v2 tag and no Xing/Info header frame: the first bytes are an audio frame's header (24 kHz is
    MPEG-2 Layer III), so a player starts on the first chunk it receives."""
    ffmpeg, _ = find_ffmpeg("ffmpeg")
    out = subprocess.run(ffmpeg_command(ffmpeg, "mp3"), input=_tone(0.5), capture_output=True, check=True).stdout
    assert out[:3] != b"ID3"
    assert out[0] == 0xFF and out[1] & 0xFE == 0xF2  # frame sync, MPEG-2, Layer III
    assert b"Xing" not in out[:1024] and b"Info" not in out[:1024]


def test_missing_ffmpeg_is_reported():
    path, reason = find_ffmpeg("definitely-not-ffmpeg")
    assert path is None and "not found" in reason


@pytest.mark.parametrize("seconds", [0.08, 1.0, 4.0])
def test_pcm_passes_every_sample_through(seconds):
    """Lossless formats keep the whole response: an input-side `-fflags +nobuffer` once cut the last 40 ms."""
    ffmpeg, _ = find_ffmpeg("ffmpeg")
    tone = _tone(seconds)
    assert subprocess.run(ffmpeg_command(ffmpeg, "pcm"), input=tone, capture_output=True, check=True).stdout == tone
    wav = subprocess.run(ffmpeg_command(ffmpeg, "wav"), input=tone, capture_output=True, check=True).stdout
    assert wav[44:] == tone


def test_warm_ffmpeg_serves_the_next_response_and_a_replacement_starts():
    """FFMPEG_WARM: the encoder's next response gets an ffmpeg already started (the same output as a fresh
    one), another starts behind it, one killed while idle is never handed out, and a one-off command line
    (a speed's tempo filter) does not stay warm."""
    import asyncio
    import os
    import signal

    from serve_app.audio.pool import WarmProcesses

    ffmpeg, _ = find_ffmpeg("ffmpeg")
    cmd = ffmpeg_command(ffmpeg, "mp3")

    async def idle_pids(pool, not_in=()):
        for _ in range(500):
            if pool.idle and not set(pool.pids) & set(not_in):
                return pool.pids
            await asyncio.sleep(0.01)
        raise AssertionError("no warm ffmpeg started")

    async def encode(proc) -> bytes:
        out, _ = await proc.communicate(_tone(0.5))
        assert proc.returncode == 0
        return out

    async def scenario():
        pool = WarmProcesses(1)
        pool.fill(tuple(cmd))
        [warm] = await idle_pids(pool)
        proc = await pool.take(cmd)
        assert proc.pid == warm and pool.idle == 0
        pool.fill(tuple(cmd))  # as the encoder does once the response's first audio is out
        fresh = subprocess.run(cmd, input=_tone(0.5), capture_output=True, check=True).stdout
        assert await encode(proc) == fresh  # bitexact: an idle process is a fresh one
        [replacement] = await idle_pids(pool, not_in=[warm])
        os.kill(replacement, signal.SIGKILL)  # our own child
        for _ in range(500):
            if pool._idle[tuple(cmd)][0].returncode is not None:
                break
            await asyncio.sleep(0.01)
        proc = await pool.take(cmd)
        assert proc.pid != replacement and await encode(proc) == fresh
        pool.fill(tuple(cmd))
        one_off = ffmpeg_command(ffmpeg, "mp3", 1.5)
        proc = await pool.take(one_off, keep_warm=False)
        assert duration(decode(await encode(proc))) == pytest.approx(0.5 / 1.5, abs=0.08)
        assert tuple(one_off) not in pool._idle
        await idle_pids(pool)
        await pool.close()
        assert pool.idle == 0

    asyncio.run(scenario())
