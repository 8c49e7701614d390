"""The request schema mirrors OpenAI's createSpeech."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.api.protocol import SpeechRequest
from serve_app.core.messages import Usage


def test_fields_in_openai_order_then_extensions():
    assert list(SpeechRequest.model_fields) == [
        "model",
        "input",
        "voice",
        "instructions",
        "response_format",
        "speed",
        "stream_format",
        # Extensions after OpenAI's fields, fenced off by a comment in protocol.py.
        "seed",
        "previous_request_ids",
        "conversation",
    ]


def test_minimal_and_full_requests():
    r = SpeechRequest.model_validate({"input": "hi"})
    assert (r.model, r.voice_name, r.response_format, r.speed, r.stream_format, r.seed) == (
        "csm-1b",
        None,
        None,
        1.0,
        "audio",
        None,
    )
    r = SpeechRequest.model_validate(
        {
            "model": "gpt-4o-mini-tts",
            "input": "hi",
            "voice": {"id": "nova"},
            "instructions": "cheerful",
            "response_format": "opus",
            "speed": 2,
            "stream_format": "sse",
            "seed": 7,
            "future_field": True,
        }
    )
    assert r.voice_name == "nova" and r.speed == 2.0 and r.seed == 7


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"input": 1},
        {"input": "x", "speed": 0.2},
        {"input": "x", "speed": 4.01},
        {"input": "x", "speed": "1"},
        {"input": "x", "response_format": "ogg"},
        {"input": "x", "stream_format": "ws"},
        {"input": "x", "voice": ["a"]},
        {"input": "x", "seed": -1},
        {"input": "x", "seed": 1.5},
        {"input": "x", "model": None},
    ],
)
def test_invalid_bodies(body):
    with pytest.raises(ValidationError):
        SpeechRequest.model_validate(body)


def test_usage_totals():
    assert Usage(input_tokens=3, output_tokens=4).as_openai() == {
        "input_tokens": 3,
        "output_tokens": 4,
        "total_tokens": 7,
    }
