"""The request's one log line and its metric updates: what the guards did travels with its Usage into both."""

from __future__ import annotations

import logging

from serve_app.core import observability
from serve_app.core.messages import Usage
from serve_app.core.observability import RequestRecord


class Recorder:
    def __init__(self, calls: list, name: str):
        self.calls, self.name = calls, name

    def inc(self, value=1.0, tags=None):
        self.calls.append((self.name, "inc", value, tags))

    def observe(self, value, tags=None):
        self.calls.append((self.name, "observe", value, tags))


def test_guards_reach_the_log_line_and_their_counter(monkeypatch, caplog):
    calls: list = []
    fake = {name: Recorder(calls, name) for name in ("ttfb", "rtf", "audio", "requests", "guards")}
    monkeypatch.setattr(observability, "metrics", lambda: fake)
    record = RequestRecord("req-1", voice="fast", fmt="wav", characters=30)
    record.usage = Usage(input_tokens=12, output_tokens=25, guards={"silent_tail": 1, "too_short": 2})
    record.mark_first_byte()
    with caplog.at_level(logging.INFO, logger="sesame_tts"):
        record.finish("ok")
    [line] = [r.getMessage() for r in caplog.records]
    assert line.endswith("status=ok guards=silent_tail:1,too_short:2 protocol=http") and "audio_s=2.00" in line
    guards = sorted((c[2], c[3]["guard"]) for c in calls if c[0] == "guards")
    assert guards == [(1, "silent_tail"), (2, "too_short")]
    assert all(c[3]["format"] == "wav" and c[3]["voice"] == "fast" for c in calls if c[0] == "guards")


def test_a_request_no_guard_acted_on_says_so(monkeypatch, caplog):
    monkeypatch.setattr(observability, "metrics", lambda: None)
    with caplog.at_level(logging.INFO, logger="sesame_tts"):
        RequestRecord("req-2").finish("ok")
    assert caplog.records[-1].getMessage().endswith("status=ok guards=- protocol=http")
