"""The estimated alignment (text/alignment.py) and what a speech context builds on: pieces' alignments made
one (api/contexts.whole), the chunk_length_schedule's release (text/chunking.SentenceStream.release), and a
context's one log line made of its pieces' records (core/observability.RequestRecord.part_of)."""

from __future__ import annotations

import logging

import pytest

from serve_app.api.contexts import whole
from serve_app.core.constants import LOGGER_NAME
from serve_app.core.messages import Usage
from serve_app.core.observability import RequestRecord
from serve_app.text.alignment import estimate
from serve_app.text.chunking import SentenceStream


@pytest.mark.parametrize("text", ["Hello there, how are you?", "a", "3.5 km — fine!", "…", "  ", "日本語です。"])
@pytest.mark.parametrize("duration_ms", [0, 80, 1234, 60_000])
def test_every_character_is_placed_in_order_and_the_last_ends_with_the_audio(text, duration_ms):
    alignment = estimate(text, duration_ms)
    assert "".join(alignment.chars) == text
    ends = [s + d for s, d in zip(alignment.starts_ms, alignment.durations_ms)]
    assert all(d >= 0 for d in alignment.durations_ms)
    assert alignment.starts_ms == [0, *ends[:-1]] and ends[-1] == duration_ms


def test_letters_take_time_and_pauses_more_than_spaces():
    alignment = estimate("ab, cd", 1000)
    letter, comma, space = alignment.durations_ms[0], alignment.durations_ms[2], alignment.durations_ms[3]
    assert comma > letter > space > 0


def test_the_forms_of_elevenlabs_websocket_and_http():
    alignment = estimate("Hi.", 300)
    assert set(alignment.websocket()) == {"chars", "charStartTimesMs", "charDurationsMs"}
    http = alignment.http(offset_ms=1000)
    assert http["characters"] == ["H", "i", "."]
    assert http["character_start_times_seconds"][0] == 1.0 and http["character_end_times_seconds"][-1] == 1.3


def test_pieces_made_one_follow_each_other_exactly():
    first, second = estimate("Hello there.", 1200), estimate(" Bye.", 400)
    given, spoken = whole([(first, first), (second, second)])
    assert "".join(given["characters"]) == "Hello there. Bye."
    assert given["character_start_times_seconds"][len("Hello there.")] == 1.2  # the second piece's space
    assert given["character_end_times_seconds"][-1] == 1.6 and spoken == given
    assert whole([]) == (None, None)


def test_the_schedule_lets_go_of_whole_words_once_enough_is_buffered():
    stream = SentenceStream()
    assert stream.feed("The quick brown fox jumps") == []
    assert stream.release(50) == ""  # not enough yet
    assert stream.release(20) == "The quick brown fox"  # up to the last space: "jumps" may go on
    assert stream.feed(" over the dog. And") == ["jumps over the dog."]
    assert stream.finish() == ["And"]


def test_a_context_logs_one_line_made_of_its_parts(caplog):
    whole_record = RequestRecord("ctx", speed=1.0, protocol="websocket", characters=20)
    for index, frames in enumerate((25, 15)):
        part = RequestRecord(f"p{index}", voice="fast", protocol="websocket", part_of=whole_record)
        part.usage = Usage(input_tokens=5, output_tokens=frames, guards={"loop": 1}, context_positions=100 + index)
        with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
            part.finish("ok")
    assert not caplog.records  # parts are silent
    assert whole_record.usage.output_tokens == 40 and whole_record.usage.guards == {"loop": 2}
    assert whole_record.usage.context_positions == 100 and whole_record.voice == "fast"
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        whole_record.finish("ok")
    (line,) = [r.getMessage() for r in caplog.records]
    assert "id=ctx voice=fast" in line and "audio_s=3.20" in line and "protocol=websocket" in line
