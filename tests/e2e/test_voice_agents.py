"""ElevenLabs' text-streaming WebSockets and timestamped speech on the real server (the session's): the
elevenlabs SDK's realtime call and its with-timestamps calls, and a raw websocket client for the protocol's
edge cases (barge-in on one of two live contexts, keepalive, EOS, the context cap, a message that is not
JSON, a foreign Origin). The audio is decoded; alignments are checked against the audio they describe. (The
key and a client that stops reading: test_security.py; busy: test_reliability.py.)"""

from __future__ import annotations

import base64

import httpx
import pytest
from elevenlabs import ElevenLabs, VoiceSettings
from websockets.exceptions import InvalidStatus

from tests.support.audio import decode_format, duration, rms
from tests.support.sockets import audio_by_context, finals, messages, send, socket
from tests.support.waiting import wait_for
from tests.support.wyoming import request_lines

pytestmark = pytest.mark.server

SENTENCES = ["Hello there, it is good to hear from you.", "How was your day today?"]


def check_alignment(alignment: dict, text: str, duration_ms: int | None = None) -> None:
    """Complete (every character, a start and a duration each), in order, and ending where the audio does."""
    chars, starts, durations = alignment["chars"], alignment["charStartTimesMs"], alignment["charDurationsMs"]
    assert "".join(chars) == text and len(starts) == len(durations) == len(chars)
    assert starts[0] == 0 and all(b >= a for a, b in zip(starts, starts[1:])) and min(durations) >= 0
    if duration_ms is not None:
        assert starts[-1] + durations[-1] == duration_ms


def until_final(*contexts: str):
    """A `messages` stop: once every one of `contexts` has had its isFinal."""
    left = set(contexts)

    def done(message: dict) -> bool:
        if message.get("isFinal"):
            left.discard(message["contextId"])
        return not left

    return done


def test_stream_input_speaks_each_sentence_then_is_final_and_closes(server):
    """Stream-input as the SDK drives it: BOS, text in pieces, EOS; pcm_24000 so the alignment can be held
    against the audio itself: each sentence's alignment spans exactly the audio that came before it."""
    before = len(server.log_text())
    with socket(server, "stream-input", output_format="pcm_24000") as ws:
        send(ws, text=" ", voice_settings={"stability": 0.5, "speed": 1.0}, generation_config={})
        for piece in ("Hello there, it is good ", "to hear from you. How was ", "your day today?"):
            send(ws, text=piece, try_trigger_generation=True)
        send(ws, text="")
        received = messages(ws)
        assert ws.close_code == 1000
    assert received[-1] == {"isFinal": True} and finals(received) == [""]
    spans, pcm = [], b""
    for message in received[:-1]:
        if message["audio"]:
            pcm += base64.b64decode(message["audio"])
        else:  # a sentence's alignment, once its audio is complete
            spans.append((message["alignment"], len(pcm)))
    assert [("".join(a["chars"])) for a, _ in spans] == [SENTENCES[0], " " + SENTENCES[1]]
    edges = [0] + [end for _, end in spans]
    for (alignment, end), start in zip(spans, edges):
        check_alignment(alignment, "".join(alignment["chars"]), round(1000 * (end - start) / 2 / 24000))
    samples, _ = decode_format(pcm, "pcm_24000")
    assert duration(samples) > 1.0 and rms(samples) > 0.01
    (line,) = wait_for(lambda: request_lines(server.log_text()[before:], "websocket"), "the context's log line")
    assert (line["status"], line["format"], int(line["chars"])) == ("ok", "pcm_24000", len(" ".join(SENTENCES)))
    assert line["ttfb_ms"] != "-" and int(line["context"]) > 0


def test_the_sdk_realtime_call_against_a_plain_http_server(server):
    """The SDK's convert_realtime always asks for wss://: pointed at ws:// (docs: Voice agents), it streams
    the text iterator's speech as mp3 (one continuous stream) and ends cleanly."""
    client = ElevenLabs(base_url=f"{server.base_url}/elevenlabs", api_key="local", timeout=120)
    client.text_to_speech._ws_base_url = f"{server.base_url.replace('http', 'ws', 1)}/elevenlabs"
    audio = b"".join(
        client.text_to_speech.convert_realtime(
            "conversational",
            text=iter(["Hello there, ", "it is good to hear ", "from you."]),
            output_format="mp3_22050_32",
            voice_settings=VoiceSettings(stability=0.5, similarity_boost=0.5, speed=1.1),
        )
    )
    samples, rate = decode_format(audio, "mp3_22050_32")
    assert rate == 22050 and duration(samples) > 0.5 and rms(samples) > 0.01


def test_barge_in_stops_one_context_and_the_other_speaks_to_its_end(server):
    """Two live contexts (auto_mode, as Pipecat): "b" is flushed and closed at once (spoken to its end), "a"
    is closed while its unflushed sentence is being generated (a barge-in): it stops, isFinal comes, and
    nothing of "a" follows. Every message names its context both ways."""
    before = len(server.log_text())
    long_text = "This is a long sentence that would go on for quite a while if nobody stopped it at all. "
    with socket(server, "multi-stream-input", output_format="mp3_22050_32", auto_mode="true") as ws:
        send(ws, text=" ", context_id="a", voice_settings={"speed": 1.0})
        send(ws, text=long_text, context_id="a")
        first = messages(ws, lambda m: m.get("audio"))[-1]  # "a" is speaking
        send(ws, text=" ", context_id="b")
        send(ws, text=SENTENCES[1] + " ", context_id="b")
        send(ws, context_id="b", flush=True)
        send(ws, context_id="b", close_context=True)
        send(ws, context_id="a", close_context=True)
        received = [first, *messages(ws, until_final("a", "b"))]
        send(ws, close_socket=True)
        assert messages(ws) == [] and ws.close_code == 1000
    assert all(m["contextId"] == m["context_id"] for m in received)
    assert sorted(finals(received)) == ["a", "b"]
    final_a = next(i for i, m in enumerate(received) if m.get("isFinal") and m["contextId"] == "a")
    assert not [m for m in received[final_a:] if m["contextId"] == "a" and m.get("audio")]
    audio = audio_by_context(received)
    samples, _ = decode_format(audio["b"], "mp3_22050_32")
    assert duration(samples) > 0.5 and rms(samples) > 0.01
    lines = wait_for(lambda: len(found := request_lines(server.log_text()[before:], "websocket")) == 2 and found, "2")
    assert sorted(line["status"] for line in lines) == ["cancelled", "ok"]


def test_keepalives_end_nothing_and_a_context_ends_on_close_context(server):
    """Pipecat's keepalives (`text: ""` with and without a context) neither end a context nor produce
    audio; the context speaks what it was given once flushed, then isFinal; close_socket speaks what was
    flushed before it closes."""
    with socket(server, "multi-stream-input", output_format="pcm_16000") as ws:
        send(ws, text=" ", context_id="c1")
        send(ws, text="")
        send(ws, text="", context_id="c1")
        send(ws, text=SENTENCES[1], context_id="c1")  # not a complete sentence yet: buffered
        send(ws, text="", context_id="c1")
        send(ws, context_id="c1", flush=True)
        send(ws, context_id="c1", close_context=True)
        received = messages(ws, until_final("c1"))
        # close_socket delivers what was flushed first: c2's audio, its isFinal, then the close.
        send(ws, text=" ", context_id="c2")
        send(ws, text=SENTENCES[0], context_id="c2", flush=True)
        send(ws, close_socket=True)
        closing = messages(ws)
        assert ws.close_code == 1000 and finals(closing) == ["c2"] and audio_by_context(closing)["c2"]
    alignments = [m["alignment"] for m in received if m.get("alignment")]
    assert [("".join(a["chars"])) for a in alignments] == [SENTENCES[1]]
    samples, rate = decode_format(audio_by_context(received)["c1"], "pcm_16000")
    assert rate == 16000 and duration(samples) > 0.5 and rms(samples) > 0.01


def test_a_sixth_context_is_refused_with_elevenlabs_error(server):
    with socket(server, "multi-stream-input") as ws:
        for index in range(6):
            send(ws, text=" ", context_id=f"c{index}")
        received = messages(ws)
        assert ws.close_code == 1008
    (error,) = [m for m in received if m.get("error")]
    assert error["error"] == "max_active_conversations" and "5 contexts" in error["message"]


@pytest.mark.parametrize("route", ["stream-input", "multi-stream-input"])
def test_a_message_that_is_not_json_closes_with_an_error(server, route):
    with socket(server, route) as ws:
        ws.send("this is not json")
        received = messages(ws)
        assert ws.close_code == 1008
    assert received == [{"message": "The message is not JSON.", "error": "invalid_request", "code": 400}]
    assert server.health().status_code == 200


def test_an_unknown_voice_or_format_is_refused(server):
    with socket(server, "stream-input", voice="nobody") as ws:
        send(ws, text=" ")
        (error,) = messages(ws)
    assert error["error"] == "invalid_voice" and ws.close_code == 1008
    with socket(server, "stream-input", output_format="wav_1") as ws:
        (error,) = messages(ws)
    assert error["error"] == "invalid_output_format"


def test_a_foreign_origin_cannot_open_the_socket(server):
    """A web page on another site would otherwise drive speech from a visitor's browser (no CORS here)."""
    with pytest.raises(InvalidStatus) as refused:
        socket(server, "stream-input", headers={"Origin": "https://evil.example"})
    assert refused.value.response.status_code == 403


def test_with_timestamps_whole_and_streamed_through_the_sdk(server):
    """POST .../with-timestamps (JSON) and .../stream/with-timestamps (NDJSON), as ElevenLabs defines them:
    the alignment covers every character, in order, and ends with the audio."""
    client = ElevenLabs(base_url=f"{server.base_url}/elevenlabs", api_key="local", timeout=120)
    text = " ".join(SENTENCES)
    whole = client.text_to_speech.convert_with_timestamps("conversational", text=text, output_format="pcm_24000")
    samples, _ = decode_format(base64.b64decode(whole.audio_base_64), "pcm_24000")
    alignment = whole.alignment
    assert "".join(alignment.characters) == text
    ends = alignment.character_end_times_seconds
    assert alignment.character_start_times_seconds[0] == 0 and ends[-1] == pytest.approx(duration(samples), abs=2e-3)
    assert all(b >= a for a, b in zip(alignment.character_start_times_seconds, ends))
    chunks = list(
        client.text_to_speech.stream_with_timestamps("conversational", text=text, output_format="mp3_22050_32")
    )
    audio = b"".join(base64.b64decode(c.audio_base_64) for c in chunks if c.audio_base_64)
    streamed, _ = decode_format(audio, "mp3_22050_32")
    assert duration(streamed) > 1.0 and rms(streamed) > 0.01
    spans = [c.alignment for c in chunks if c.alignment is not None]
    assert ["".join(a.characters) for a in spans] == [SENTENCES[0], " " + SENTENCES[1]]  # its space first
    assert spans[1].character_start_times_seconds[0] == spans[0].character_end_times_seconds[-1]


@pytest.mark.parametrize("route", ["with-timestamps", "stream/with-timestamps"])
def test_with_timestamps_refuses_what_has_nothing_to_speak_or_an_unknown_voice_as_elevenlabs_does(server, route):
    base = f"{server.base_url}/elevenlabs/v1/text-to-speech"
    empty = httpx.post(f"{base}/conversational/{route}", json={"text": "👋 🙂"}, timeout=60)
    assert empty.status_code == 400 and empty.json()["detail"]["status"] == "empty_input"
    unknown = httpx.post(f"{base}/nobody/{route}", json={"text": "Hello."}, timeout=60)
    assert unknown.status_code == 404 and unknown.json()["detail"]["status"] == "voice_not_found"


def test_the_side_by_side_benchmark_measures_both_clients_and_the_barge_in(server, tmp_path):
    """ops/bench/agents.py's measurements and report, against this server (its own server part is the users'
    benchmark's, tested in test_bench.py): the long sentence is cut off by close_context, so what follows the
    close is at most the groups already on their way, never the rest of the sentence."""
    from ops.bench import agents as bench

    times = bench.measure(server.base_url, rounds=1)
    assert {key: len(values) for key, values in times.items()} == dict.fromkeys(times, 1)
    assert all(0 < value < 120 for value in times["http"] + times["websocket"] + times["websocket_gap"])
    # The long sentence runs to the cap here (4.9 s, ~61 frames): its rest would be ~10 groups of 6 frames.
    assert 0 <= times["barge_in_groups"][0] < 5
    result = {"checkpoint": "tiny", "rounds": 1, "frames": 0, **bench.summarize(times)}
    bench.save_side_bench(result, "ops.bench.agents", "agents-tiny", tmp_path, bench.render, [])
    [folder] = list(tmp_path.iterdir())
    assert "| WebSocket, auto_mode" in (folder / "agents-tiny.md").read_text()
    assert set(result["targets"]) == {"websocket_within_1.1x", "gaps_under_3s", "barge_in_within_2_groups"}
