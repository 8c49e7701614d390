"""The ElevenLabs dialect (/elevenlabs) driven by the official `elevenlabs` Python SDK and by OpenClaw's own
ElevenLabs provider, against the real server: audio at the requested codec and rate, voices, models, errors
in ElevenLabs' shape."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from elevenlabs import ElevenLabs, VoiceSettings
from elevenlabs.core.api_error import ApiError
from elevenlabs.errors import UnprocessableEntityError

from tests.support.audio import decode_format, duration, probe, rms

pytestmark = pytest.mark.server
OPENCLAW_VOICE_ID = re.compile(r"^[a-zA-Z0-9]{10,40}$")  # OpenClaw's isValidElevenLabsVoiceId


@pytest.fixture(scope="module")
def client(server) -> ElevenLabs:
    return ElevenLabs(base_url=f"{server.base_url}/elevenlabs", api_key="local", timeout=120)


def check_audio(data: bytes, fmt: str, rate: int) -> None:
    samples, declared = decode_format(data, fmt)
    assert declared == rate
    assert duration(samples) > 0.3 and rms(samples) > 0.01


def test_voices_and_models_lists(client):
    voices = client.voices.get_all().voices
    by_name = {v.name: v for v in voices}
    assert {"conversational", "professional", "fast", "whisper"} <= set(by_name)
    assert all(OPENCLAW_VOICE_ID.match(v.voice_id) for v in voices)  # every voice passes clients' checks
    assert client.voices.get(by_name["fast"].voice_id).name == "fast"
    assert [m.model_id for m in client.models.list()] == ["csm-1b"]


@pytest.mark.parametrize(
    "fmt, rate",
    [
        ("mp3_44100_128", 44100),
        ("mp3_22050_32", 22050),
        ("pcm_16000", 16000),
        ("pcm_44100", 44100),
        ("ulaw_8000", 8000),
        ("opus_48000_64", 48000),
    ],
)
def test_convert_in_each_format(client, fmt, rate):
    audio = b"".join(
        client.text_to_speech.convert(
            "conversational",
            text="Hello from the ElevenLabs route.",
            model_id="eleven_multilingual_v2",
            output_format=fmt,
            seed=4,
        )
    )
    check_audio(audio, fmt, rate)


@pytest.mark.parametrize("fmt, rate", [("mp3_44100_128", 44100), ("pcm_24000", 24000)])
def test_stream_arrives_in_pieces(client, fmt, rate):
    voice = next(v.voice_id for v in client.voices.get_all().voices if v.name == "fast")
    chunks = list(
        client.text_to_speech.stream(
            voice,
            text="Streaming one frame group at a time, as it is made.",
            output_format=fmt,
            optimize_streaming_latency=3,
            voice_settings=VoiceSettings(speed=1.2, stability=0.5),
        )
    )
    assert len(chunks) > 1
    check_audio(b"".join(chunks), fmt, rate)


def test_errors_in_elevenlabs_shape(client):
    with pytest.raises(ApiError) as missing:  # the SDK has no class of its own for a 404 here
        b"".join(client.text_to_speech.convert("noSuchVoice123", text="Hi."))
    assert missing.value.status_code == 404 and missing.value.body["detail"]["status"] == "voice_not_found"
    with pytest.raises(UnprocessableEntityError):
        b"".join(client.text_to_speech.convert("conversational", text="Hi.", output_format="wav_99"))


@pytest.mark.network  # npm installs OpenClaw on a first run
def test_openclaw_elevenlabs_provider_with_base_url(server, openclaw, tmp_path):
    """OpenClaw's own ElevenLabs provider (its voice-id check, its request, its reading of the audio) with
    `baseUrl` pointed here; OpenClaw's default voice id is an alias of the default preset."""
    cli, path = openclaw
    home = tmp_path / "home"
    (home / ".openclaw").mkdir(parents=True)
    (home / ".openclaw" / "openclaw.json").write_text(
        json.dumps(
            {
                "tts": {
                    "provider": "elevenlabs",
                    "timeoutMs": 60000,
                    "providers": {
                        "elevenlabs": {
                            "apiKey": "local",
                            "baseUrl": f"{server.base_url}/elevenlabs",
                            "modelId": "eleven_multilingual_v2",
                        }
                    },
                }
            }
        )
    )
    out = tmp_path / "speech.mp3"
    result = subprocess.run(
        [
            str(cli),
            "infer",
            "tts",
            "convert",
            "--text",
            "Hello Burke, this is Max on the ElevenLabs route.",
            "--output",
            str(out),
            "--json",
        ],
        env={**os.environ, "HOME": str(home), "PATH": path},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["provider"] == "elevenlabs" and report["attempts"][-1]["outcome"] == "success"
    data = out.read_bytes()
    info = probe(data)["stream"]
    assert (info["codec_name"], int(info["sample_rate"])) == ("mp3", 44100)
    assert rms(decode_format(data, "mp3_44100_128")[0]) > 0.01
