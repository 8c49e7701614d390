"""Custom voices in OpenAI's shape through the official `openai` SDK against the real server: consents and
voices, every route the SDK has, with real audio. (Hostile uploads and the settings that guard creation are
in-process: tests/http/test_custom_voices.py.)"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support.audio import decode, duration, probe, rms
from tests.support.local_app import make_clips

pytestmark = pytest.mark.server

TRANSCRIPT = "Hello, this is my voice for the test."


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    return make_clips("wav", "mp3", "m4a")


def test_openai_sdk_consents_and_voices_end_to_end(openai_client, server, clips):
    """Every route the SDK has: consent create / retrieve / update / list (paged) / delete, voice create /
    delete; the voice speaks by id and by name with real audio, and is gone after deletion."""
    client = openai_client
    consent = client.audio.voice_consents.create(
        name="Jo Tester", language="en-US", recording=("consent.wav", clips["wav"], "audio/x-wav")
    )
    second = client.audio.voice_consents.create(
        name="Second", language="de", recording=("consent.mp3", clips["mp3"], "audio/mpeg")
    )
    voice = None
    try:
        assert consent.object == "audio.voice_consent" and consent.id.startswith("cons_") and consent.created_at > 0
        assert client.audio.voice_consents.retrieve(consent.id).name == "Jo Tester"
        assert client.audio.voice_consents.update(consent.id, name="Jo T.").name == "Jo T."
        first_page = client.audio.voice_consents.list(limit=1)
        assert len(first_page.data) == 1 and first_page.has_more
        every = [c.id for c in client.audio.voice_consents.list(limit=1)]  # iterating follows `after`
        assert sorted(every) == sorted([consent.id, second.id])

        voice = client.audio.voices.create(
            name="Jo",
            consent=consent.id,
            extra_body={"transcript": TRANSCRIPT},
            audio_sample=("sample.m4a", clips["m4a"], "audio/mp4"),
        )
        assert voice.object == "audio.voice" and voice.id.startswith("voice_") and voice.type == "audio_sample"
        extra = voice.model_extra
        assert extra["transcript"] == TRANSCRIPT and extra["conditioning"] == "audio_and_transcript"
        assert 2.9 < extra["duration_s"] < 3.1

        listed = httpx.get(f"{server.api}/audio/voices", timeout=10).json()["voices"]
        assert {"id": voice.id, "name": "Jo"}.items() <= next(v for v in listed if v["id"] == voice.id).items()
        for ref in ({"id": voice.id}, "jo"):  # by id (OpenAI's object form) and by name
            with client.audio.speech.with_streaming_response.create(
                model="csm-1b", voice=ref, input="Cloned voices speak too.", response_format="mp3"
            ) as response:
                audio = response.read()
            info = probe(audio)["stream"]
            assert (info["codec_name"], int(info["sample_rate"]), int(info["channels"])) == ("mp3", 24000, 1)
            samples = decode(audio)
            assert duration(samples) > 0.3 and rms(samples) > 0.01

        deleted = client.audio.voices.delete(voice.id)
        assert (deleted.id, deleted.deleted, deleted.object) == (voice.id, True, "audio.voice.deleted")
        voice = None
        with pytest.raises(openai.NotFoundError):
            client.audio.voices.delete(deleted.id)
        with pytest.raises(openai.BadRequestError) as refused:
            client.audio.speech.create(model="csm-1b", voice={"id": deleted.id}, input="Gone?")
        assert refused.value.body["param"] == "voice"
    finally:
        if voice is not None:
            client.audio.voices.delete(voice.id)
        for c in (consent, second):
            gone = client.audio.voice_consents.delete(c.id)
            assert (gone.id, gone.deleted) == (c.id, True)
    with pytest.raises(openai.NotFoundError):
        client.audio.voice_consents.retrieve(consent.id)
