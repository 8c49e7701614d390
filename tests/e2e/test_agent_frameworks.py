"""The voice-agent frameworks, unmodified, with their base URLs pointed at the session's real server (the
docs' Voice agents page gives each client's URL): Pipecat's `ElevenLabsTTSService` (multi-stream-input) and
`ElevenLabsHttpTTSService` (/stream/with-timestamps), and LiveKit Agents' elevenlabs plugin, streaming
(multi-stream-input) and one-shot (/stream), in mp3 and pcm. The audio they hand on is decoded; Pipecat's
word frames (built from our alignment) must be the text's words, in order.

The frameworks' own timeouts (Pipecat ends a context after 3 s without audio, LiveKit waits 10 s) are raised
here: this is a protocol test that must hold on a loaded CI machine; the time to first audio and the gaps
are the agents benchmark's (ops/bench/agents.py)."""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import numpy as np
import pytest

from tests.support.audio import decode_format, duration, rms
from tests.support.waiting import wait_for
from tests.support.wyoming import request_lines

pytestmark = pytest.mark.server
needs_pipecat = pytest.mark.skipif(sys.version_info < (3, 11), reason="Pipecat publishes for Python 3.11+ only")

TEXT = "Hello there, it is good to hear from you. How was your day today?"
PIECES = ["Hello there, it is good ", "to hear from you. ", "How was your day today?"]
PATIENCE_S = 60.0


async def pipecat_frames(tts) -> tuple[bytes, list[str], list]:
    """Run Pipecat's own test pipeline over `tts` with one spoken turn: (pcm, words, error frames)."""
    from pipecat.frames.frames import ErrorFrame, TTSAudioRawFrame, TTSSpeakFrame, TTSTextFrame
    from pipecat.tests.utils import run_test

    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame(TEXT)], start_timeout=PATIENCE_S)
    audio = b"".join(frame.audio for frame in down if isinstance(frame, TTSAudioRawFrame))
    words = [frame.text for frame in down if isinstance(frame, TTSTextFrame)]
    return audio, words, [frame for frame in [*down, *up] if isinstance(frame, ErrorFrame)]


def check_pipecat(audio: bytes, words: list[str], errors: list, rate: int) -> None:
    assert errors == []
    samples, decoded_rate = decode_format(audio, f"pcm_{rate}")
    assert decoded_rate == rate and duration(samples, rate) > 1.0 and rms(samples) > 0.01
    assert [word.strip() for word in words] == TEXT.split()


@needs_pipecat
@pytest.mark.parametrize("rate", [24000, 16000])
def test_pipecat_websocket_service_speaks_with_word_timestamps(server, rate):
    """ElevenLabsTTSService as a Pipecat app builds it: ws://host:port/elevenlabs, auto_mode, pcm_{rate}
    (Pipecat asks for the pipeline's sample rate); its words come from the alignment we send."""
    from pipecat.services.elevenlabs.tts import ElevenLabsTTSService

    url = server.base_url.replace("http", "ws", 1) + "/elevenlabs"
    tts = ElevenLabsTTSService(
        api_key="local",
        settings=ElevenLabsTTSService.Settings(voice="conversational"),
        url=url,
        sample_rate=rate,
        stop_frame_timeout_s=PATIENCE_S,
    )
    check_pipecat(*asyncio.run(pipecat_frames(tts)), rate)


@needs_pipecat
def test_pipecat_http_service_speaks_with_word_timestamps(server):
    """ElevenLabsHttpTTSService: http://host:port/elevenlabs, POST /stream/with-timestamps (NDJSON); Pipecat
    reports the words from each line's alignment."""
    from pipecat.services.elevenlabs.tts import ElevenLabsHttpTTSService

    async def run():
        async with aiohttp.ClientSession() as session:
            tts = ElevenLabsHttpTTSService(
                api_key="local",
                settings=ElevenLabsHttpTTSService.Settings(voice="conversational"),
                base_url=f"{server.base_url}/elevenlabs",
                aiohttp_session=session,
                sample_rate=16000,
                stop_frame_timeout_s=PATIENCE_S,
            )
            return await pipecat_frames(tts)

    check_pipecat(*asyncio.run(run()), 16000)


def livekit_tts(session: aiohttp.ClientSession, server, encoding: str):
    from livekit.plugins import elevenlabs

    return elevenlabs.TTS(
        api_key="local",
        voice_id="conversational",
        base_url=f"{server.base_url}/elevenlabs/v1",
        encoding=encoding,
        http_session=session,
    )


def livekit_audio(frames) -> tuple[np.ndarray, int]:
    """LiveKit hands on decoded 16-bit PCM frames (it decodes mp3 itself)."""
    pcm = np.concatenate([np.frombuffer(frame.data, dtype=np.int16) for frame in frames])
    return pcm.astype(np.float32) / 32768, frames[0].sample_rate


@pytest.mark.parametrize(("encoding", "rate"), [("mp3_22050_32", 22050), ("pcm_24000", 24000)])
def test_livekit_plugin_streams_text_as_it_is_written(server, encoding, rate):
    """LiveKit's TTS stream (multi-stream-input at http://host:port/elevenlabs/v1): text pushed in pieces as
    an LLM writes it, then end of input; all of it is spoken, in the encoding asked for."""
    from livekit.agents import APIConnectOptions

    async def run():
        async with aiohttp.ClientSession() as session:
            tts = livekit_tts(session, server, encoding)
            stream = tts.stream(conn_options=APIConnectOptions(timeout=PATIENCE_S))
            for piece in PIECES:
                stream.push_text(piece)
            stream.end_input()
            frames = [event.frame async for event in stream]
            await stream.aclose()
            await tts.aclose()
            return frames

    before = len(server.log_text())
    samples, decoded_rate = livekit_audio(asyncio.run(run()))
    assert decoded_rate == rate and duration(samples, rate) > 1.0 and rms(samples) > 0.01
    # LiveKit closes the socket as soon as it has its isFinal, while the server may still be sending: that
    # ends quietly (it once left two tracebacks from Serve's proxy per socket).
    wait_for(lambda: request_lines(server.log_text()[before:], "websocket"), "the context's log line")
    wait_for(lambda: "multi-stream-input closed" in server.log_text()[before:], "the socket's close")
    assert "Traceback" not in server.log_text()[before:]


def test_livekit_plugin_one_shot(server):
    """LiveKit's `synthesize` (one text, POST /stream) in pcm."""
    from livekit.agents import APIConnectOptions

    async def run():
        async with aiohttp.ClientSession() as session:
            tts = livekit_tts(session, server, "pcm_24000")
            stream = tts.synthesize(TEXT, conn_options=APIConnectOptions(timeout=PATIENCE_S))
            frames = [event.frame async for event in stream]
            await tts.aclose()
            return frames

    samples, rate = livekit_audio(asyncio.run(run()))
    assert rate == 24000 and duration(samples, rate) > 1.0 and rms(samples) > 0.01
