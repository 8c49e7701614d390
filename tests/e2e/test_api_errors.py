"""Every bad request gets OpenAI's error body with the right status, and nothing else is disturbed."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support.audio import decode, rms

pytestmark = pytest.mark.server

CASES = [
    # (body, param, code, words in the message)
    ({"input": ""}, "input", "empty_input", "empty"),
    ({"input": " \n\t "}, "input", "empty_input", "empty"),
    ({"input": "x" * 4097}, "input", "string_above_max_length", "4096"),
    ({"input": "hi", "voice": "nobody"}, "voice", "invalid_voice", "conversational, fast, professional, whisper"),
    ({"input": "hi", "voice": "../../etc/passwd"}, "voice", "invalid_voice", "not available"),
    ({"input": "hi", "response_format": "ogg"}, "response_format", "invalid_value", "'mp3'"),
    ({"input": "hi", "speed": 0.1}, "speed", "invalid_value", "0.25"),
    ({"input": "hi", "speed": 4.5}, "speed", "invalid_value", "4"),
    ({"input": "hi", "speed": "fast"}, "speed", "invalid_type", "number"),
    ({"input": 42}, "input", "invalid_type", "string"),
    ({"input": "hi", "voice": 7}, "voice", "invalid_type", "voice"),
    ({"input": "hi", "stream_format": "websocket"}, "stream_format", "invalid_value", "'sse'"),
    ({"input": "hi", "seed": "abc"}, "seed", "invalid_type", "integer"),
    ({"voice": "conversational"}, "input", "missing_required_parameter", "input"),
]


def assert_openai_error(response: httpx.Response, status: int, param, code) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["code"] == code
    assert "Traceback" not in error["message"]
    return error


@pytest.mark.parametrize("body,param,code,words", CASES, ids=[c[2] + ":" + str(c[1]) for c in CASES])
def test_invalid_requests_get_400_bodies(server, body, param, code, words):
    error = assert_openai_error(httpx.post(f"{server.api}/audio/speech", json=body, timeout=30), 400, param, code)
    assert error["type"] == "invalid_request_error"
    assert words in error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b'"text"'])
def test_malformed_json_gets_400(server, raw):
    response = httpx.post(
        f"{server.api}/audio/speech", content=raw, timeout=30, headers={"Content-Type": "application/json"}
    )
    error = assert_openai_error(response, 400, None, "invalid_json")
    assert error["type"] == "invalid_request_error"


def test_unknown_route_and_method(server):
    assert_openai_error(httpx.get(f"{server.api}/nothing-here", timeout=10), 404, None, None)
    assert_openai_error(httpx.get(f"{server.api}/audio/speech", timeout=10), 405, None, None)
    assert_openai_error(httpx.get(f"{server.api}/models/gpt-4", timeout=10), 404, "model", "model_not_found")


def test_openai_sdk_raises_bad_request_with_the_message(openai_client):
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.audio.speech.create(model="csm-1b", voice="nobody", input="hi")
    assert info.value.status_code == 400
    assert "Available voices" in info.value.message


def test_errors_do_not_disturb_the_next_request(server):
    for body, *_ in CASES[:4]:
        httpx.post(f"{server.api}/audio/speech", json=body, timeout=30)
    response = httpx.post(
        f"{server.api}/audio/speech", json={"input": "Still fine.", "response_format": "wav"}, timeout=60
    )
    assert response.status_code == 200
    assert rms(decode(response.content)) > 0.01


def test_models_voices_and_health(server):
    models = httpx.get(f"{server.api}/models", timeout=10).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["csm-1b"]
    assert {"object", "created", "owned_by"} <= set(models["data"][0])
    assert httpx.get(f"{server.api}/models/csm-1b", timeout=10).json()["id"] == "csm-1b"

    voices = httpx.get(f"{server.api}/audio/voices", timeout=10).json()["voices"]
    assert {v["id"] for v in voices} == {"conversational", "professional", "fast", "whisper"}
    assert all(set(v) == {"id", "name", "description"} and v["description"] for v in voices)

    health = httpx.get(f"{server.base_url}/health", timeout=10)
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok"
    assert body["model"]["status"] == "ready"
    # Whatever MLX runs on here (the CPU in CI, Metal on a Mac, CUDA with mlx[cuda]), named the same way.
    assert body["device"] == body["model"]["device"] in ("cpu", "gpu (metal)", "gpu (cuda)")
    assert body["model"]["worker"]["alive"] and body["model"]["worker"]["task"] in (None, "step", "admit")
    # The voices' prefilled prefixes: conversational and whisper share one clip, professional has its own.
    assert body["model"]["prefix_cache"]["entries"] == 2 and body["model"]["prefix_cache"]["mb"] > 0
    assert body["ffmpeg"].startswith("ffmpeg version")
    assert "conversational" in body["voices"]
