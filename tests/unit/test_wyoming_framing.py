"""The Wyoming listener's parts without a server: the bounded event reader (lengths refused before anything
they claim is read), sentences found in streamed text by the chunker's rules, where the port listens when
a key is set, and the zeroconf record Home Assistant browses for (built and read back, no multicast)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from wyoming.tts import Synthesize, SynthesizeVoice

from serve_app.api import discovery
from serve_app.api.wyoming import ProtocolError, program_info, read_event
from serve_app.core.messages import VoiceInfo
from serve_app.core.settings import Settings
from serve_app.text.chunking import SentenceStream, split_sentences


def read(raw: bytes, max_data: int = 1000):
    async def go():
        reader = asyncio.StreamReader(limit=1024)
        reader.feed_data(raw)
        reader.feed_eof()
        return await read_event(reader, max_data, timeout=5)

    return asyncio.run(go())


def framed(event) -> bytes:
    """An event as the wyoming package writes it (header line, then its data)."""
    import json

    data = json.dumps(event.data).encode()
    return json.dumps({"type": event.type, "data_length": len(data)}).encode() + b"\n" + data


def test_an_event_as_the_wyoming_package_frames_it_is_read_whole():
    event = read(framed(Synthesize(text="Hi there.", voice=SynthesizeVoice(name="fast")).event()))
    assert event.type == "synthesize" and event.data == {"text": "Hi there.", "voice": {"name": "fast"}}


@pytest.mark.parametrize(
    "raw",
    [
        b'{"type": "synthesize", "data_length": 1001}\n',  # more data than is taken: refused on the header
        b'{"type": "synthesize", "payload_length": 1}\n',  # a TTS server is sent no payload
        b'{"type": "synthesize", "data_length": -1}\n',
        b'{"type": "synthesize", "data_length": "12"}\n',
        b'{"type": "run-program"}\n',  # not an event this server takes
        b'{"data": {}}\n',
        b'["synthesize"]\n',
        b'{"type": "synthesize", "data": [1]}\n',
        b'{"type": "synthesize", "data_length": 3}\n[1]',
    ],
)
def test_what_is_not_a_tts_event_is_refused_before_its_body(raw):
    with pytest.raises(ProtocolError):
        read(raw)


def test_a_header_line_beyond_the_readers_limit_and_a_cut_stream():
    with pytest.raises(ValueError):  # asyncio's LimitOverrunError is a ValueError through readline
        read(b'{"type": "describe"' + b" " * 2000 + b"}\n")
    assert read(b'{"type": "desc') is None  # the client left mid-line
    assert read(b"") is None
    with pytest.raises(asyncio.IncompleteReadError):
        read(b'{"type": "synthesize", "data_length": 50}\n{"text"')


def test_sentences_are_let_go_once_something_follows_their_end():
    stream = SentenceStream()
    assert stream.feed("It costs 3.") == []  # may yet be 3.5
    assert stream.feed("5 dollars, Dr. Smith said") == []  # "Dr." is no end
    assert stream.feed(". Then") == ["It costs 3.5 dollars, Dr. Smith said."]
    assert stream.feed(' he left! "Really?"') == ["Then he left!"]
    assert stream.feed(" Yes\nNo") == ['"Really?"', "Yes"]  # a newline ends one at once
    assert stream.finish() == ["No"]
    assert stream.finish() == []


def test_a_stream_makes_the_same_sentences_as_the_chunker_however_it_is_cut():
    text = "Mr. J. Doe arrived at 7.30 today. He said: “Fine.” Really? Yes… of course! Bye."
    whole = split_sentences(text)
    assert whole[0] == "Mr. J. Doe arrived at 7.30 today."
    for size in (1, 2, 5, 13):
        stream = SentenceStream()
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        got = [sentence for piece in pieces for sentence in stream.feed(piece)] + stream.finish()
        assert got == whole, size


def test_a_run_on_without_an_end_is_let_go_at_a_space():
    stream = SentenceStream(max_chars=20)
    assert stream.feed("one two three four five six") == ["one two three four"]
    assert stream.finish() == ["five six"]


def settings(**values) -> Settings:
    return Settings.load({"WYOMING_PORT": "10200", **values})


def test_with_a_key_the_port_faces_the_lan_only_by_choice(caplog):
    assert discovery.wyoming_host(settings(HOST="0.0.0.0")) == "0.0.0.0"
    assert discovery.wyoming_host(settings(HOST="0.0.0.0", API_KEY="sk-x")) == "127.0.0.1"
    assert "WYOMING_WITHOUT_KEY" in caplog.text
    assert discovery.wyoming_host(settings(HOST="0.0.0.0", API_KEY="sk-x", WYOMING_WITHOUT_KEY="1")) == "0.0.0.0"
    assert discovery.wyoming_host(settings(HOST="127.0.0.1", API_KEY="sk-x")) == "127.0.0.1"


def test_the_announced_address_is_the_lan_one_and_never_loopback():
    assert discovery.lan_address("127.0.0.1") is None and discovery.lan_address("localhost") is None
    assert discovery.lan_address("192.168.1.20") == "192.168.1.20"
    address = discovery.lan_address("0.0.0.0")  # this machine's route for multicast DNS, if it has one
    assert address is None or not discovery.is_loopback(address)


def test_the_zeroconf_record_is_what_home_assistant_browses_for():
    info = discovery.service_info("192.168.1.20", 10200, name="sesame-tts-studio")
    assert info.type == "_wyoming._tcp.local."
    assert info.name == "sesame-tts-studio._wyoming._tcp.local."
    assert info.port == 10200
    assert [socket.inet_ntoa(a) for a in info.addresses] == ["192.168.1.20"]
    assert info.properties == {b"program": b"sesame-tts"}
    default = discovery.service_info("10.0.0.2", 10200)
    assert default.name.startswith("sesame-tts-") and default.name.endswith("._wyoming._tcp.local.")


def test_info_lists_the_voices_given_as_english_and_installed():
    voices = [VoiceInfo(id="fast", name="fast", description="Quick.")]
    (program,) = program_info(voices).tts
    assert [v.name for v in program.voices] == ["fast"] and program.voices[0].languages == ["en"]
    assert program.supports_synthesize_streaming and program.voices[0].description == "Quick."


def test_a_port_that_cannot_be_had_is_reported_and_nothing_else_stops():
    from serve_app.api.wyoming import WyomingListener

    async def go():
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            listener = WyomingListener(settings(WYOMING_PORT=str(port)), "127.0.0.1", None, None)
            return await listener.start(), listener.report()

    started, report = asyncio.run(go())
    assert not started and "cannot listen on 127.0.0.1:" in report["error"]


def test_only_text_with_something_to_speak_goes_to_the_model():
    from serve_app.api.wyoming import WyomingListener

    listener = WyomingListener(settings(), "127.0.0.1", None, None)
    assert listener.speakable("Hello **there**.") and listener.speakable("👋 Hi.")
    assert not any(listener.speakable(text) for text in ("", "  ", "👍", "---", "```", "\ud800"))
