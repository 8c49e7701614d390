"""Home Assistant's Wyoming protocol on the real server (the session's, with WYOMING_PORT on), driven by the
wyoming package's own AsyncTcpClient: describe, one-shot and streaming synthesis with the audio decoded,
context across a stream's sentences as prefilled (the request log's `context=`), a client that leaves,
unknown voices, and malformed, oversized and unknown events. (A client that stops reading:
test_security.py; busy: test_reliability.py; the framing's bounds and zeroconf: tests/unit/test_wyoming_framing.py.)"""

from __future__ import annotations

import asyncio
import json

import pytest
from wyoming.audio import AudioStart
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from tests.support.audio import duration, rms
from tests.support.waiting import wait_for
from tests.support.wyoming import client, closed, pcm, read_until, request_lines

pytestmark = pytest.mark.server

PRESETS = {"conversational", "fast", "professional", "whisper"}


def test_describe_lists_one_streaming_tts_program_with_every_preset(server):
    async def go():
        async with client(server) as wyoming:
            await wyoming.write_event(Describe().event())
            return Info.from_event((await read_until(wyoming, "info"))[-1])

    (program,) = asyncio.run(go()).tts
    assert program.supports_synthesize_streaming and program.installed and program.name == "sesame-tts"
    assert "CSM-1B" in program.attribution.name and program.attribution.url.startswith("https://")
    voices = {voice.name: voice for voice in program.voices}
    assert set(voices) >= PRESETS
    assert all(voice.languages == ["en"] and voice.description and voice.installed for voice in voices.values())


def test_one_shot_synthesis_streams_frame_groups_of_audible_speech(server):
    """Markdown and emoji are taken out as on HTTP; the audio comes as a chunk per decoded frame group."""
    before = len(server.log_text())
    served = server.health().json()["model"]["served"]
    text = "**Hello** there, how are you today? 👋"

    async def go():
        async with client(server) as wyoming:
            await wyoming.write_event(Synthesize(text=text, voice=SynthesizeVoice(name="fast")).event())
            return await read_until(wyoming, "audio-stop")

    events = asyncio.run(go())
    start = AudioStart.from_event(events[0])
    assert (start.rate, start.width, start.channels) == (24000, 2, 1)
    chunks = [e for e in events if e.type == "audio-chunk"]
    assert len(chunks) >= 2 and events[-1].type == "audio-stop" and len(events) == len(chunks) + 2
    samples = pcm(events)
    assert duration(samples) > 0.5 and rms(samples) > 0.01
    (line,) = wait_for(lambda: request_lines(server.log_text()[before:]), "the request's log line")
    assert (line["voice"], line["format"], line["status"]) == ("fast", "pcm", "ok")
    assert int(line["chars"]) == len(text)
    assert server.health().json()["model"]["served"] == served + 1  # (the empty clip's test relies on this)


def test_streaming_speaks_each_sentence_as_it_completes_with_the_earlier_ones_as_context(server):
    """Three sentences split mid-word across chunks: the first is spoken before the second has arrived; each
    is its own audio group; a markdown rule between them is no sentence; the compatibility copy says nothing;
    each later sentence hears the earlier ones."""
    before = len(server.log_text())
    pieces = ["Good morni", "ng to you. How did you sl", "eep last night?\n---\n👋 I hope it was w", "ell."]

    async def go():
        async with client(server) as wyoming:
            await wyoming.write_event(SynthesizeStart(voice=SynthesizeVoice(name="conversational")).event())
            for piece in pieces[:2]:
                await wyoming.write_event(SynthesizeChunk(text=piece).event())
            first = await read_until(wyoming, "audio-chunk")  # before the second sentence is complete
            for piece in pieces[2:]:
                await wyoming.write_event(SynthesizeChunk(text=piece).event())
            await wyoming.write_event(Synthesize(text="".join(pieces)).event())  # the copy for old servers
            await wyoming.write_event(SynthesizeStop().event())
            return first + await read_until(wyoming, "synthesize-stopped")

    events = asyncio.run(go())
    kinds = [e.type for e in events]
    assert kinds[0] == "audio-start" and kinds[-1] == "synthesize-stopped"
    assert kinds.count("audio-start") == kinds.count("audio-stop") == 3  # and none for the copy
    groups = "".join({"audio-start": "[", "audio-chunk": "c", "audio-stop": "]"}.get(k, "") for k in kinds)
    assert groups.replace("c", "") == "[][][]" and "[]" not in groups  # every group holds audio
    assert rms(pcm(events)) > 0.01

    def three_lines():
        found = request_lines(server.log_text()[before:])
        return found if len(found) == 3 else None

    lines = wait_for(three_lines, "the stream's three request log lines")
    sentences = ["Good morning to you.", "How did you sleep last night?", "👋 I hope it was well."]
    assert [int(line["chars"]) for line in lines] == [len(sentence) for sentence in sentences]
    context = [int(line["context"]) for line in lines]
    assert 0 < context[0] < context[1] < context[2]  # the voice's clip, then it and the earlier sentences


def test_a_client_that_leaves_cancels_its_generation(server):
    """~65 s of speech at the test caps; the client takes the first chunk and leaves. The request ends as
    cancelled with a fraction of that audio, and the model is free again (its own health says so)."""
    before = len(server.log_text())
    text = "A long paragraph that would take many seconds to speak in full. " * 20

    async def go():
        async with client(server) as wyoming:
            await wyoming.write_event(Synthesize(text=text).event())
            await read_until(wyoming, "audio-chunk")

    asyncio.run(go())
    (line,) = wait_for(lambda: request_lines(server.log_text()[before:]), "the request's log line", timeout=120)
    assert line["status"] == "cancelled" and float(line["audio_s"]) < 30, line
    wait_for(lambda: server.health().json()["model"]["generating"] == 0, "the model's batch is empty")
    assert server.health().json()["in_flight"] == 0


@pytest.mark.parametrize("streaming", [False, True], ids=["synthesize", "synthesize-start"])
def test_an_unknown_voice_is_an_error_event_naming_it_and_the_voices_and_no_audio(server, streaming):
    async def go():
        async with client(server) as wyoming:
            voice = SynthesizeVoice(name="nobody-here")
            if streaming:
                await wyoming.write_event(SynthesizeStart(voice=voice).event())
                await wyoming.write_event(SynthesizeChunk(text="Hello there. ").event())
            else:
                await wyoming.write_event(Synthesize(text="Hello there.", voice=voice).event())
            events = await read_until(wyoming, "error", "audio-start")
            return events, await closed(wyoming)

    events, was_closed = asyncio.run(go())
    assert [e.type for e in events] == ["error"] and was_closed
    message = events[0].data["text"]
    assert "nobody-here" in message and "conversational" in message and events[0].data["code"]


@pytest.mark.parametrize("text", ["   ", "👍 👍", "---"], ids=["spaces", "emoji", "markdown-rule"])
def test_text_with_nothing_to_speak_is_an_empty_clip_and_asks_no_model(server, text):
    served = server.health().json()["model"]["served"]

    async def go():
        async with client(server) as wyoming:
            await wyoming.write_event(Synthesize(text=text).event())
            return await read_until(wyoming, "audio-stop")

    assert [e.type for e in asyncio.run(go())] == ["audio-start", "audio-stop"]
    assert server.health().json()["model"]["served"] == served  # what the model counts as it finishes


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"this is not json\n", "refused"),
        (b'{"type": "transcribe"}\n', "unknown event 'transcribe'"),
        (b'{"type": "synthesize", "data_length": 1000000000}\n', "1000000000 bytes of data"),
        (b'{"type": "synthesize", "payload_length": 5}\n', "5 of payload"),
        (b'{"type": "synthesize-chunk", "data": {"text": "hi"}}\n', "outside a stream"),
        (b'{"type": "describe"' + b" " * 20000 + b"}\n", "refused"),
    ],
    ids=["not-json", "unknown", "huge-data", "payload", "chunk-alone", "long-header"],
)
def test_a_bad_event_closes_its_connection_at_once_and_nothing_else(server, line, why):
    """The huge `data_length` is refused on its header, before any data: none is ever sent here, so a reader
    that waited for it would hold the connection until the body deadline instead."""
    before = len(server.log_text())

    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", server.health().json()["wyoming"]["port"])
        writer.write(line)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 60)  # up to the server's close
        writer.close()
        async with client(server) as wyoming:  # the listener is unharmed
            await wyoming.write_event(Describe().event())
            info = await read_until(wyoming, "info")
        return answer, info

    answer, info = asyncio.run(go())
    assert answer == b"" and info[-1].type == "info"

    def refusals() -> list[str]:  # Ray forwards the replica's lines to the log as they come, not at once
        log = server.log_text()[before:]
        return [entry for entry in log.splitlines() if "wyoming: connection from" in entry and "refused" in entry]

    (refusal,) = wait_for(refusals, "the connection's refusal in the log")
    assert why in refusal, refusal
    assert "Traceback" not in server.log_text()[before:]


def test_data_that_is_not_an_object_closes_the_connection_too(server):
    data = json.dumps(["text"]).encode()

    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", server.health().json()["wyoming"]["port"])
        writer.write(b'{"type": "synthesize", "data_length": %d}\n' % len(data) + data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        return answer

    assert asyncio.run(go()) == b""


def test_the_side_by_side_benchmark_measures_all_three_clients(server, tmp_path):
    """ops/bench/wyoming.py's measurements and report, against this server (its own server part is the
    users' benchmark's, tested in test_bench.py)."""
    from ops.bench import wyoming as bench

    times = bench.measure(server.base_url, server.health().json()["wyoming"]["port"], rounds=1)
    assert {key: len(values) for key, values in times.items()} == dict.fromkeys(times, 1)
    assert all(0 < value < 120 for values in times.values() for value in values)
    result = {"checkpoint": "tiny", "rounds": 1, "frames": 0, **bench.summarize(times)}
    bench.save_side_bench(result, "ops.bench.wyoming", "wyoming-tiny", tmp_path, bench.render, [])
    [folder] = list(tmp_path.iterdir())
    assert "| Wyoming one-shot" in (folder / "wyoming-tiny.md").read_text()
    assert set(result["targets"]) == {"one_shot_within_1.1x", "stream_within_http_plus_50ms"}
