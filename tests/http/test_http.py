"""The HTTP layer, fast and in-process: Serve's local testing mode runs the real deployment classes of the
real application graph (ingress, text frontend, encoder with real ffmpeg, the CSM model on the tiny
checkpoint) in this process, and httpx drives the ingress's own ASGI app. No Ray cluster, no network.

Covered here: validation and error mapping (OpenAI bodies, never FastAPI's `detail`), text the model cannot
take, the status decided before the first byte, SSE framing, API-key rules (the way Open WebUI calls the
lists), admission leases and the one log line per speech request. End-to-end paths over real HTTP (clients,
streaming, disconnects, a killed replica) stay in the full-server tests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from serve_app.core.settings import Settings
from tests.support.audio import decode, duration, rms
from tests.support.forcing import quiet_frames
from tests.support.local_app import SPEECH, LocalApp, assert_error, make_settings

TEXT = "Hello from the in-process app."


@pytest.fixture(scope="module")
def local(tiny_checkpoint, tmp_path_factory) -> LocalApp:
    return LocalApp(make_settings(tiny_checkpoint, tmp_path_factory))


@pytest.fixture(scope="module")
def keyed(tiny_checkpoint, tmp_path_factory) -> LocalApp:
    return LocalApp(
        make_settings(tiny_checkpoint, tmp_path_factory, api_key="sk-local", max_batch_size=1, max_queued_requests=0)
    )


def raw_json(body: dict) -> bytes:
    """The body as a JSON client sends it: non-ASCII escaped, so even a lone surrogate travels ("\\ud800")."""
    return json.dumps(body).encode()


def test_speech_streams_real_audio(local):
    response = local.request("POST", SPEECH, json={"input": TEXT, "response_format": "wav", "seed": 1})
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    samples = decode(response.content)
    assert duration(samples) == pytest.approx(0.5 + 0.02 * len(TEXT), abs=0.1) and rms(samples) > 0.01


@pytest.mark.parametrize("fmt", ["wav", "pcm"])
def test_server_timing_says_where_the_first_byte_went(local, fmt):
    """Every speech response carries a `Server-Timing` header: admission, planning, the model's time to its
    first PCM (as the encoder saw it), ffmpeg's time to its first bytes (not for raw pcm), the hops, and the
    total, which is at least the sum of the stages it contains."""
    response = local.request("POST", SPEECH, json={"input": TEXT, "response_format": fmt, "seed": 1})
    assert response.status_code == 200 and len(response.content) > 0
    stages = {
        name: float(dur)
        for name, _, dur in (entry.strip().partition(";dur=") for entry in response.headers["server-timing"].split(","))
    }
    expected = {"admit", "plan", "model", "hops", "total"} | ({"encode"} if fmt != "pcm" else set())
    assert set(stages) == expected, stages
    assert stages["model"] > 0 and stages["total"] >= stages["model"] + stages["plan"] + stages["admit"]
    assert all(v >= 0 for k, v in stages.items() if k != "hops")


@pytest.mark.parametrize(
    "content,param,code",
    [
        (raw_json({"input": "\ud800"}), "input", "invalid_input"),  # a JSON escape of a lone surrogate
        ('{"input": "a\ud800b"}'.encode("utf-8", "surrogatepass"), "input", "invalid_input"),  # its raw bytes
        (raw_json({"input": "Fine \udfff then"}), "input", "invalid_input"),
        (raw_json({"input": "\u200b\u2060\u200b"}), "input", "invalid_input"),  # only invisible format characters
        (raw_json({"input": "\ue000\U000f0000"}), "input", "invalid_input"),  # only private-use code points
        (b'{"input": "caf\xe9"}', None, "invalid_json"),  # Latin-1, not UTF-8
        (b'{"input": "\xff\xfe"}', None, "invalid_json"),
        (b"\xef\xbb\xbf\xff", None, "invalid_json"),
    ],
    ids=[
        "escaped-surrogate",
        "surrogatepass-bytes",
        "low-surrogate",
        "zero-width",
        "private-use",
        "latin-1",
        "ff-fe",
        "bom-junk",
    ],
)
def test_text_that_cannot_be_spoken_gets_400_before_the_model(local, content, param, code):
    response = local.request("POST", SPEECH, content=content, headers={"Content-Type": "application/json"})
    error = assert_error(response, 400, param, code)
    assert error["type"] == "invalid_request_error"
    assert local.request("POST", SPEECH, json={"input": "Still fine.", "response_format": "pcm"}).status_code == 200


@given(text=st.text(alphabet=st.characters(codec=None, exclude_categories=()), min_size=1, max_size=40))
@hypothesis_settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@pytest.mark.slow("property-based: many generated inputs, each spoken")
def test_any_text_is_spoken_or_refused_with_a_400(local, text):
    """Any code points at all, surrogates and controls included: audio, or a 400 naming `input`."""
    response = local.request(
        "POST",
        SPEECH,
        content=raw_json({"input": text, "response_format": "pcm"}),
        headers={"Content-Type": "application/json"},
    )
    refusal = expected_refusal(text)
    if refusal is None:
        assert response.status_code == 200, response.text
        assert len(response.content) > 0 and len(response.content) % 2 == 0
    else:
        assert_error(response, 400, "input", refusal)


def expected_refusal(text: str):
    """The code the frontend must refuse `text` with, from the text rules alone (None: it is spoken)."""
    from serve_app.text.chunking import normalize, why_unspeakable
    from serve_app.text.markdown import strip_markdown

    if not normalize(text):
        return "empty_input"
    if why_unspeakable(text):
        return "invalid_input"
    return "empty_input" if why_unspeakable(strip_markdown(text)) else None


@pytest.mark.parametrize(
    "body,status,param,code",
    [
        ({"input": "hi", "speed": 9}, 400, "speed", "invalid_value"),
        ({"input": "hi", "response_format": "ogg"}, 400, "response_format", "invalid_value"),
        ({"voice": "fast"}, 400, "input", "missing_required_parameter"),
        ({"input": "hi", "voice": "nobody"}, 400, "voice", "invalid_voice"),
    ],
)
def test_validation_errors_are_openai_bodies(local, body, status, param, code):
    assert_error(local.request("POST", SPEECH, json=body), status, param, code)


def test_routing_errors_are_openai_bodies(local):
    assert_error(local.request("GET", "/v1/nothing"), 404, None, None)
    assert_error(local.request("GET", SPEECH), 405, None, None)
    assert_error(local.request("GET", "/v1/models/gpt-4"), 404, "model", "model_not_found")


def test_sse_framing(local):
    response = local.request(
        "POST", SPEECH, json={"input": TEXT, "stream_format": "sse", "response_format": "pcm", "seed": 3}
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    *deltas, done = payloads
    assert deltas and all(d["type"] == "speech.audio.delta" for d in deltas)
    assert done["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(d["audio"]) for d in deltas)
    frames = done["usage"]["output_tokens"]
    assert len(pcm) == frames * 1920 * 2 and done["usage"]["total_tokens"] == frames + done["usage"]["input_tokens"]
    plain = local.request("POST", SPEECH, json={"input": TEXT, "response_format": "pcm", "seed": 3})
    assert plain.content == pcm  # the same audio either way


def test_failure_before_the_first_byte_is_a_status_not_a_broken_200(tiny_checkpoint, tmp_path_factory):
    broken = LocalApp(make_settings(tiny_checkpoint, tmp_path_factory, ffmpeg_path="/nonexistent/ffmpeg"))
    for fmt, sse in (("mp3", False), ("opus", True)):
        body = {"input": TEXT, "response_format": fmt, "stream_format": "sse" if sse else "audio"}
        error = assert_error(broken.request("POST", SPEECH, json=body), 503, None, "ffmpeg_unavailable")
        assert "/nonexistent/ffmpeg" in error["message"]
    assert broken.request("GET", "/health").status_code == 503


def test_api_key_guards_speech_and_lists_stay_open_as_open_webui_calls_them(keyed):
    assert_error(keyed.request("POST", SPEECH, json={"input": "hi"}), 401, None, "invalid_api_key")
    assert_error(
        keyed.request("POST", SPEECH, json={"input": "hi"}, headers={"Authorization": "Bearer nope"}),
        401,
        None,
        "invalid_api_key",
    )
    ok = keyed.request(
        "POST", SPEECH, json={"input": "hi", "response_format": "pcm"}, headers={"Authorization": "Bearer sk-local"}
    )
    assert ok.status_code == 200 and len(ok.content) > 0
    # Open WebUI with a custom TTS base URL: GET {base}/audio/models and {base}/audio/voices, no key sent.
    models = keyed.request("GET", "/v1/audio/models")
    assert models.status_code == 200 and [m["id"] for m in models.json()["models"]] == ["csm-1b"]
    voices = keyed.request("GET", "/v1/audio/voices")
    assert voices.status_code == 200
    assert {v["id"]: v["name"] for v in voices.json()["voices"]}["conversational"] == "conversational"
    assert keyed.request("GET", "/v1/models").json()["data"][0]["id"] == "csm-1b"


def test_elevenlabs_routes_take_the_key_as_xi_api_key_and_answer_in_their_shape(keyed):
    path = "/elevenlabs/v1/text-to-speech/conversational?output_format=pcm_24000"
    refused = keyed.request("POST", path, json={"text": "hi"}, headers={"xi-api-key": "nope"})
    assert refused.status_code == 401 and refused.json()["detail"]["status"] == "invalid_api_key"
    ok = keyed.request("POST", path, json={"text": "hi"}, headers={"xi-api-key": "sk-local"})
    assert ok.status_code == 200 and ok.headers["content-type"] == "audio/pcm" and len(ok.content) > 0
    too_big = keyed.request(
        "POST",
        path,
        content=b"x" * (Settings().max_request_bytes + 1),
        headers={"xi-api-key": "sk-local", "content-type": "application/json"},
    )
    assert too_big.status_code == 413 and too_big.json()["detail"]["status"] == "request_too_large"
    invalid = keyed.request("POST", path, json={"txt": "hi"}, headers={"xi-api-key": "sk-local"})
    assert invalid.status_code == 422 and invalid.json()["detail"][0]["loc"] == ["body", "text"]


@pytest.mark.slow("property-based: many generated inputs, each spoken")
def test_markdown_and_emoji_never_reach_the_model(local, tiny_checkpoint, tmp_path_factory):
    """Same seed: markdown with emoji sounds exactly like its plain words (the model got the same text); with
    STRIP_MARKDOWN off it does not. A reply of only a code block has nothing to speak."""

    def pcm(app, text):
        response = app.request("POST", SPEECH, json={"input": text, "response_format": "pcm", "seed": 11})
        assert response.status_code == 200, response.text
        return response.content

    marked, plain = "## Hi **there** 👋🏽\n- [see this](https://x.io)", "Hi there\nsee this"
    assert pcm(local, marked) == pcm(local, plain)
    raw = LocalApp(make_settings(tiny_checkpoint, tmp_path_factory, strip_markdown=False))
    assert pcm(raw, marked) != pcm(raw, plain)
    assert_error(local.request("POST", SPEECH, json={"input": "```\nrm -rf /\n```"}), 400, "input", "empty_input")


def test_lists_need_the_key_when_configured(tiny_checkpoint, tmp_path_factory):
    closed = LocalApp(make_settings(tiny_checkpoint, tmp_path_factory, api_key="sk-local", lists_need_api_key=True))
    for path in ("/v1/models", "/v1/models/csm-1b", "/v1/audio/models", "/v1/audio/voices"):
        assert_error(closed.request("GET", path), 401, None, "invalid_api_key")
        assert closed.request("GET", path, headers={"Authorization": "Bearer sk-local"}).status_code == 200
    assert closed.request("GET", "/health").status_code == 200  # health never needs it


def test_admission_lease_429_and_the_log_line_per_speech_request(keyed, caplog):
    """Capacity 1 (MAX_BATCH_SIZE=1, MAX_QUEUED_REQUESTS=0): a second request while one is generating gets
    429 with Retry-After; the place comes back when the first response ends. Each speech request is one
    log line; a 401 on a list is not a speech request."""
    auth = {"Authorization": "Bearer sk-local"}

    async def two():
        async with keyed.client() as c:
            first = asyncio.create_task(
                c.post(SPEECH, json={"input": TEXT * 2, "response_format": "pcm"}, headers=auth)
            )
            await asyncio.sleep(0)  # the first is admitted before the second arrives
            while (await c.get("/health")).json()["in_flight"] == 0:
                await asyncio.sleep(0.01)
            second = await c.post(SPEECH, json={"input": "hi"}, headers=auth)
            return await first, second, (await c.get("/health")).json()["in_flight"]

    with caplog.at_level(logging.INFO, logger="sesame_tts"):
        first, second, after = keyed.call(two())
        listed = keyed.request("GET", "/v1/models/csm-1b", headers={"Authorization": "Bearer wrong"})
    assert first.status_code == 200 and len(first.content) > 0
    assert_error(second, 429, None, "rate_limit_exceeded")
    assert second.headers["retry-after"].isdigit()
    assert after == 0  # the lease went back with the first response
    assert listed.status_code == 200  # lists are open: a wrong key there changes nothing
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request id=")]
    assert sum("status=ok" in line for line in lines) == 1 and sum("status=429" in line for line in lines) == 1
    assert len(lines) == 2


def test_shutting_down_503_is_logged_like_every_answer(local, caplog):
    flag = local.settings.drain_flag
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.touch()
    try:
        with caplog.at_level(logging.INFO, logger="sesame_tts"):
            response = local.request("POST", SPEECH, json={"input": "late"})
        assert_error(response, 503, None, "shutting_down")
        assert response.headers["retry-after"].isdigit()
        assert any("status=503" in r.getMessage() and "chars=4" in r.getMessage() for r in caplog.records)
        assert local.request("GET", "/health").json()["status"] == "draining"
    finally:
        flag.unlink()
    assert local.request("GET", "/health").json()["in_flight"] == 0


def test_a_guard_that_acts_is_in_the_request_log_and_the_audio(local, caplog, monkeypatch):
    """Speech for 8 frames, then quiet (forced at Mimi's output, in this process): the silent tail keeps 0.4 s
    of it, the wav holds 13 frames, and the request's log line says which guard acted."""
    text = "Quiet after a few words, then nothing at all for the rest of this chunk, which is long enough."
    assert len(text) <= 100  # one chunk: 0.5 + 0.02 x 95 s = 30 frames, the quiet run reaches 1.5 s at frame 26
    quiet_frames(monkeypatch, 8, 1000)
    with caplog.at_level(logging.INFO, logger="sesame_tts"):
        response = local.request("POST", SPEECH, json={"input": text, "response_format": "wav", "seed": 3})
    assert response.status_code == 200
    samples = decode(response.content)
    assert duration(samples) == pytest.approx(13 * 0.08, abs=0.01) and rms(samples[: 8 * 1920]) > 0.05
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request id=")]
    assert "guards=silent_tail:1" in line and "audio_s=1.04" in line
    assert any(r.getMessage().startswith("guard silent_tail fired") for r in caplog.records)


def test_one_request_id_in_the_header_the_log_line_and_error_responses(local, keyed, caplog):
    """Each response carries exactly one `x-request-id`, and the request's log line names the same id: for
    audio, for a 400, and for a 401 turned away on the headers. An id the client sends (Serve's proxy keeps
    it) is adopted; one that is not a short token is refused. Serve's proxy itself: tests/e2e/test_reliability.py."""

    def ids(response) -> list[str]:
        return [value for name, value in response.headers.multi_items() if name.lower() == "x-request-id"]

    with caplog.at_level(logging.INFO, logger="sesame_tts"):
        audio = local.request("POST", SPEECH, json={"input": TEXT, "response_format": "pcm"})
        bad = local.request("POST", SPEECH, json={"input": TEXT, "voice": "nobody"})
        unauthorized = keyed.request("POST", SPEECH, json={"input": TEXT})
        chosen = local.request("POST", SPEECH, json={"input": ""}, headers={"x-request-id": "client-chosen.1"})
    assert audio.status_code == 200 and len(audio.content) > 0
    assert_error(bad, 400, "voice", "invalid_voice")
    assert_error(unauthorized, 401, None, "invalid_api_key")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request id=")]
    for response, status in ((audio, "ok"), (bad, "400"), (unauthorized, "401")):
        (request_id,) = ids(response)
        assert [line for line in lines if f"id={request_id} " in line and f"status={status}" in line], lines
    assert ids(chosen) == [] and any("id=client-chosen.1 " in line for line in lines)  # the proxy echoes it
    refused = local.request("POST", SPEECH, json={"input": TEXT}, headers={"x-request-id": "a b/" + "x" * 200})
    assert_error(refused, 400, "x-request-id", "invalid_request_id")
