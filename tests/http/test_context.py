"""Conversation context across requests, in the real application (Serve's local testing mode, the tiny
checkpoint): each response's id names what it said; `previous_request_ids` and `conversation` (OpenAI route,
our extensions) and ElevenLabs' request stitching put earlier turns before the text as CSM context. Fixed
seeds throughout: context changes the audio, the same context gives the same audio again, a new
conversation is the same as none, and unknown ids are 400s naming the field."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.support.audio import decode, rms
from tests.support.local_app import SPEECH, LocalApp, assert_error, make_settings


@pytest.fixture(scope="module")
def app(tiny_checkpoint, tmp_path_factory) -> LocalApp:
    return LocalApp(make_settings(tiny_checkpoint, tmp_path_factory))


def speak(app: LocalApp, text: str, seed: int, **extra):
    response = app.request("POST", SPEECH, json={"input": text, "response_format": "pcm", "seed": seed, **extra})
    assert response.status_code == 200, response.text
    assert len(response.content) > 0
    return response.content, response.headers["x-request-id"]


def test_a_previous_response_changes_the_next_and_the_same_context_repeats(app):
    _, first = speak(app, "Did you get my message about dinner?", seed=1)
    alone, _ = speak(app, "Yes, seven works for me.", seed=2)
    heard, _ = speak(app, "Yes, seven works for me.", seed=2, previous_request_ids=[first])
    again, _ = speak(app, "Yes, seven works for me.", seed=2, previous_request_ids=[first])
    assert heard != alone  # the context reached CSM
    assert heard == again  # and the same context with the same seed says the same
    assert rms(decode(heard, "pcm")) > 0.01


def test_a_conversation_keeps_its_turns_and_a_new_one_is_no_context(app):
    alone, _ = speak(app, "Hello there.", seed=5)
    opened, turn_one = speak(app, "Hello there.", seed=5, conversation="kitchen")
    assert opened == alone  # a new conversation's first turn: no context
    named, _ = speak(app, "How was your day?", seed=6, previous_request_ids=[turn_one])
    continued, _ = speak(app, "How was your day?", seed=6, conversation="kitchen")
    bare, _ = speak(app, "How was your day?", seed=6)
    assert continued == named != bare  # the conversation's last turn is the context, as if named


@pytest.mark.parametrize(
    "extra,code",
    [
        ({"previous_request_ids": ["0123456789ab"]}, "unknown_request_id"),
        ({"previous_request_ids": ["a", "b", "c", "d"]}, "invalid_value"),
        ({"previous_request_ids": "abc"}, "invalid_type"),
        ({"conversation": "has spaces"}, "invalid_value"),
    ],
)
def test_unknown_or_malformed_context_is_a_400_naming_the_field(app, extra, code):
    response = app.request("POST", SPEECH, json={"input": "Hi.", **extra})
    assert_error(response, 400, next(iter(extra)), code)


def test_health_reports_the_memory(app):
    speak(app, "Something to remember.", seed=9)
    memory = app.request("GET", "/health").json()["utterance_memory"]
    assert memory["utterances"] >= 1 and 0 < memory["bytes"] <= memory["max_bytes"]


def test_the_elevenlabs_sdk_stitches_with_a_previous_request_id(app):
    """ElevenLabs' own SDK, unchanged: the request-id of one response in the next one's previous_request_ids."""
    from elevenlabs.client import AsyncElevenLabs

    async def go():
        async with app.client() as http:
            client = AsyncElevenLabs(base_url="http://localhost:8880/elevenlabs", api_key="local", httpx_client=http)
            tts = client.text_to_speech.with_raw_response

            async def convert(**kw) -> tuple[bytes, str]:
                async with tts.convert("conversational", output_format="pcm_24000", seed=3, **kw) as response:
                    return b"".join([piece async for piece in response.data]), response.headers["request-id"]

            # No terminal punctuation: CSM gets "Are you coming tonight." (TERMINAL_PUNCTUATION), and the client's
            # own previous_text still names it (words are compared).
            _, first = await convert(text="Are you coming tonight")
            stitched, _ = await convert(text="I will be there at eight.", previous_request_ids=[first])
            alone, _ = await convert(text="I will be there at eight.")
            by_text, _ = await convert(text="I will be there at eight.", previous_text="Are you coming tonight")
            return stitched, alone, by_text

    stitched, alone, by_text = asyncio.run(go())
    assert stitched != alone
    assert by_text == stitched  # previous_text names the same remembered utterance (same voice)


def test_elevenlabs_refuses_more_than_three_ids_in_its_own_shape(app):
    response = app.request(
        "POST",
        "/elevenlabs/v1/text-to-speech/conversational",
        json={"text": "Hi.", "previous_request_ids": ["a", "b", "c", "d"]},
    )
    assert response.status_code == 400
    assert set(response.json()) == {"detail"} and "at most 3" in response.json()["detail"]["message"]


def test_the_memory_is_bounded_by_bytes_and_age():
    from serve_app.core.errors import InvalidRequestError
    from serve_app.core.messages import Utterance
    from serve_app.text.utterances import UtteranceMemory

    now = [0.0]
    memory = UtteranceMemory(
        max_bytes=3 * 32 * 100 * 2 + 200, max_age_s=60, turns=2, conversation_age_s=30, clock=lambda: now[0]
    )
    said = [Utterance("v", 0, f"turn {i}", np.ones((32, 100), np.int16)) for i in range(4)]
    for i, u in enumerate(said):
        memory.remember(f"r{i}", u, conversation="c")
    assert memory.report()["evicted"] == 1  # the least recently used went first
    with pytest.raises(InvalidRequestError) as info:
        memory.context(["r0"])
    assert info.value.param == "previous_request_ids" and info.value.code == "unknown_request_id"
    assert [s.text for s in memory.context(["r1", "r3"])] == ["turn 1", "turn 3"]
    assert [s.text for s in memory.conversation("c")] == ["turn 2", "turn 3"]  # its last two turns
    now[0] = 31.0
    assert memory.conversation("c") == []  # the conversation went quiet for too long
    now[0] = 61.0
    with pytest.raises(InvalidRequestError):
        memory.context(["r3"])  # too old


def test_a_reused_request_id_never_replaces_what_was_said_under_it():
    """Clients may choose their request id (Serve keeps the one a client sends): a later request under the same
    id is not remembered over the earlier one, which another client may be naming as its context."""
    from serve_app.core.messages import Utterance
    from serve_app.text.utterances import UtteranceMemory

    memory = UtteranceMemory(max_bytes=1 << 20, max_age_s=60, turns=2, conversation_age_s=30)
    memory.remember("chosen", Utterance("v", 0, "the first", np.ones((32, 10), np.int16)))
    memory.remember("chosen", Utterance("v", 0, "an impostor", np.zeros((32, 10), np.int16)))
    assert [s.text for s in memory.context(["chosen"])] == ["the first"]
