"""The real application (Ray Serve, CSM on the tiny checkpoint, ffmpeg) driven by the openai SDK and httpx."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest

from tests.support.audio import decode, duration, probe, rms
from tests.support.servers import one_request_id_names_the_next, session_processes

pytestmark = pytest.mark.server

TEXT = "Hello Burke, this is Max."

# format -> (ffprobe format_name, codec_name, sample rate as decoded, exact bit rate, approximate kbps)
EXPECTED = {
    "mp3": ("mp3", "mp3", "24000", 64000, None),
    "opus": ("ogg", "opus", "48000", None, 32),  # Opus always decodes at 48 kHz; the input rate is in OpusHead
    "aac": ("aac", "aac", "24000", None, 64),
    "flac": ("flac", "flac", "24000", None, None),
    "wav": ("wav", "pcm_s16le", "24000", 384000, None),
}
CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}


def speech(server, timeout=60, **body) -> httpx.Response:
    body.setdefault("input", TEXT)
    return httpx.post(f"{server.api}/audio/speech", json=body, timeout=timeout)


def assert_audible(samples: np.ndarray, min_seconds: float = 0.3) -> None:
    assert duration(samples) >= min_seconds, f"only {duration(samples):.2f} s of audio"
    assert rms(samples) > 0.01, f"audio is silent (rms {rms(samples):.5f})"


@pytest.mark.parametrize("fmt", sorted(EXPECTED))
def test_each_container_format_decodes(openai_client, fmt):
    with openai_client.audio.speech.with_streaming_response.create(
        model="csm-1b", voice="conversational", input=TEXT, response_format=fmt
    ) as response:
        assert response.headers["content-type"] == CONTENT_TYPES[fmt]
        assert "content-length" not in response.headers
        assert response.headers["transfer-encoding"] == "chunked"
        data = response.read()
    info = probe(data)
    format_name, codec, rate, bit_rate, kbps = EXPECTED[fmt]
    assert info["format"]["format_name"] == format_name
    assert info["stream"]["codec_name"] == codec
    assert info["stream"]["sample_rate"] == rate
    assert info["stream"]["channels"] == 1
    if bit_rate:
        assert int(info["stream"]["bit_rate"]) == bit_rate
    samples = decode(data)
    assert_audible(samples)
    if kbps:  # size over duration, container overhead included
        assert 0.6 * kbps < len(data) * 8 / 1000 / duration(samples) < 1.5 * kbps


def test_wav_header_is_a_streaming_header(server):
    data = speech(server, response_format="wav").content
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt "
    assert data[4:8] == b"\xff\xff\xff\xff"  # RIFF size unknown while streaming
    assert data[36:40] == b"data" and data[40:44] == b"\xff\xff\xff\xff"


def test_pcm_is_raw_s16le_24k_mono(server):
    response = speech(server, response_format="pcm", seed=3)
    assert response.headers["content-type"] == "audio/pcm"
    assert len(response.content) % 2 == 0
    samples = decode(response.content, "pcm")
    assert_audible(samples)
    # The runaway cap (0.5 s + 0.05 s/char here) bounds the tiny model, which never stops by itself.
    assert duration(samples) == pytest.approx(0.5 + 0.05 * len(TEXT), abs=0.1)


def test_default_format_is_mp3(server):
    response = httpx.post(f"{server.api}/audio/speech", json={"input": TEXT, "voice": "conversational"}, timeout=60)
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/mpeg"
    assert probe(response.content)["stream"]["codec_name"] == "mp3"


def test_brief_curl_without_model_or_format(server):
    response = httpx.post(
        f"{server.api}/audio/speech", json={"input": "Hello Burke, this is Max.", "voice": "conversational"}, timeout=60
    )
    assert response.status_code == 200
    assert_audible(decode(response.content))


def test_speed_two_halves_duration_with_same_seed(server):
    normal = decode(speech(server, response_format="pcm", seed=11, speed=1.0).content, "pcm")
    fast = decode(speech(server, response_format="pcm", seed=11, speed=2.0).content, "pcm")
    slow = decode(speech(server, response_format="wav", seed=11, speed=0.5).content)
    assert duration(fast) / duration(normal) == pytest.approx(0.5, abs=0.06)
    assert duration(slow) / duration(normal) == pytest.approx(2.0, abs=0.15)
    assert_audible(fast)


def test_seed_makes_audio_reproducible(server):
    a = speech(server, response_format="pcm", seed=5).content
    b = speech(server, response_format="pcm", seed=5).content
    c = speech(server, response_format="pcm", seed=6).content
    assert a == b
    assert a != c


def test_sse_events_parse_and_decode(server):
    with httpx.stream(
        "POST",
        f"{server.api}/audio/speech",
        timeout=60,
        json={"input": TEXT, "stream_format": "sse", "response_format": "mp3"},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2
    assert events[-1]["type"] == "speech.audio.done"
    usage = events[-1]["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert probe(audio)["stream"]["codec_name"] == "mp3"
    assert_audible(decode(audio))


def test_response_streams_in_chunks_before_generation_ends(server):
    text = "This sentence is long enough to take a while. " * 3  # ~8 s of audio at the test cap
    arrivals = []
    started = time.perf_counter()
    with httpx.stream(
        "POST", f"{server.api}/audio/speech", timeout=60, json={"input": text, "response_format": "pcm"}
    ) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            arrivals.append((time.perf_counter() - started, len(chunk)))
    assert len(arrivals) >= 5
    first, last = arrivals[0][0], arrivals[-1][0]
    # The first audio arrives long before the last: it left the model while later frames were generated.
    assert first < 0.35 * last, f"first chunk at {first:.2f} s, last at {last:.2f} s"
    assert duration(np.zeros(sum(n for _, n in arrivals) // 2)) > 5


def test_openai_voice_alias_object_voice_and_unknown_field(openai_client):
    with openai_client.audio.speech.with_streaming_response.create(
        model="tts-1",
        voice="alloy",
        input=TEXT,
        response_format="wav",
        extra_body={"some_future_field": {"x": 1}, "seed": 1},
    ) as response:
        assert response.status_code == 200
        assert_audible(decode(response.read()))
    response = httpx.post(
        f"{openai_client.base_url}audio/speech",
        timeout=60,
        json={"input": TEXT, "voice": {"id": "shimmer"}, "response_format": "wav"},
    )
    assert response.status_code == 200
    assert_audible(decode(response.content))


def test_a_responses_id_names_it_in_the_next_request(openai_client):
    """Under the launcher (our proxy middleware in Serve's proxy) as under a bare `serve run`
    (test_reliability.py): one `x-request-id`, which names the response in the next request."""
    one_request_id_names_the_next(openai_client)


def test_voices_change_the_audio(server):
    a = speech(server, response_format="pcm", seed=2, voice="conversational").content
    b = speech(server, response_format="pcm", seed=2, voice="fast").content
    quiet = decode(speech(server, response_format="pcm", seed=2, voice="whisper").content, "pcm")
    assert a != b
    assert rms(quiet) < rms(decode(a, "pcm"))  # whisper plays 8 dB quieter


def test_four_simultaneous_requests(openai_client):
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fmt = ["mp3", "opus", "wav", "flac"][i]
            results[i] = openai_client.audio.speech.create(
                model="csm-1b", voice="conversational", input=f"Request number {i}.", response_format=fmt
            ).content
        except BaseException as exc:  # collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 4
    for data in results.values():
        assert_audible(decode(data))


def _ffmpeg_pids(server) -> list[int]:
    """The ffmpeg processes of this test's own server that serve a response: its encoder's children, in the
    server's session, less the idle ones it keeps started (FFMPEG_WARM; /health lists them). (Never every
    ffmpeg on the machine: a developer's own jobs are not ours to see or kill.)"""
    warm = set(httpx.get(f"{server.base_url}/health", timeout=30).json()["encoders_warm"]["pids"])
    return [
        pid
        for line in session_processes(server.proc.pid)
        if line.split()[2].rsplit("/", 1)[-1] == "ffmpeg" and (pid := int(line.split()[1])) not in warm
    ]


def _wait_ffmpeg(server, running: bool, timeout: float = 5.0) -> list[int]:
    """ffmpeg pids, once they are (running=True) or are not (False) there, or at the timeout."""
    deadline = time.monotonic() + timeout
    while bool(_ffmpeg_pids(server)) != running and time.monotonic() < deadline:
        time.sleep(0.02)
    return _ffmpeg_pids(server)


def _kill_ffmpeg(server) -> None:
    pids = _ffmpeg_pids(server)
    assert pids, "the response's ffmpeg should be running"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def test_disconnect_frees_the_model_and_kills_ffmpeg(server):
    long_text = "A long paragraph that would take many seconds to speak in full. " * 20  # ~1300 chars
    with httpx.stream(
        "POST", f"{server.api}/audio/speech", timeout=60, json={"input": long_text, "response_format": "mp3"}
    ) as response:
        assert response.status_code == 200
        chunks = response.iter_raw()  # held: a dropped iterator closes the stream at once
        next(chunks)
        assert _wait_ffmpeg(server, running=True, timeout=1.0), "the response's ffmpeg should be running"
    # Closed after the first chunk. Left running, the rest would take over 10 s of generation here.
    started = time.perf_counter()
    with httpx.stream(
        "POST", f"{server.api}/audio/speech", timeout=60, json={"input": "Next!", "response_format": "pcm"}
    ) as response:
        chunks = response.iter_raw()
        next(chunks)
        first_byte = time.perf_counter() - started
        assert sum(len(c) for c in chunks) > 0
    assert first_byte < 2.0, f"next request waited {first_byte:.2f} s: the abandoned one kept the model"
    assert _wait_ffmpeg(server, running=False) == [], "ffmpeg processes left behind"


def test_ffmpeg_dying_mid_stream_aborts_the_body(server):
    text = "Keep talking for a while so that there is time to break the encoder. " * 4
    with httpx.stream(
        "POST", f"{server.api}/audio/speech", timeout=60, json={"input": text, "response_format": "mp3"}
    ) as response:
        assert response.status_code == 200
        chunks = response.iter_raw()
        next(chunks)
        _kill_ffmpeg(server)
        with pytest.raises(httpx.HTTPError):  # an aborted chunked body, never a clean end
            for _ in chunks:
                pass
    assert speech(server, response_format="wav").status_code == 200  # the model slot was freed


def test_ffmpeg_dying_mid_stream_ends_sse_with_error_event(server):
    text = "Keep talking for a while so that there is time to break the encoder. " * 4
    with httpx.stream(
        "POST",
        f"{server.api}/audio/speech",
        timeout=60,
        json={"input": text, "response_format": "mp3", "stream_format": "sse"},
    ) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        _kill_ffmpeg(server)
        rest = [line for line in lines if line]
    assert rest[-1] != "data: [DONE]"
    event = json.loads(rest[-1][6:])
    assert event["type"] == "error"
    assert set(event["error"]) == {"message", "type", "param", "code"}
    assert event["error"]["code"] == "generation_failed"
