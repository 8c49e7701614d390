"""Character timing (ElevenLabs' `alignment`) for speech whose length is known but whose inside is not.

CSM is autoregressive and has no duration model: what is known exactly is where each generated piece (a
sentence, one request to the model) starts and ends, to the 80 ms frame. Inside a piece the characters are
placed by an estimate: the piece's real duration is shared out in proportion to a weight per character, so
the estimate always ends exactly where the audio does.

The weights model how speech spends time on text, roughly: a letter or digit is one unit; a space is a
short gap (0.3); a comma, semicolon, colon or dash a pause (2); a sentence end a longer one (3); anything
else (quotes, brackets, symbols) nothing. Word times taken from it are good to a syllable or two on ordinary
prose, and can be off by more on numbers, abbreviations and long pauses the model chose to make.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

_PAUSE, _STOP = ",;:—–-", ".!?…。！？"


def _weight(char: str) -> float:
    if char.isspace():
        return 0.3
    if char in _STOP:
        return 3.0
    if char in _PAUSE:
        return 2.0
    return 1.0 if unicodedata.category(char)[0] in "LN" else 0.0


@dataclass(frozen=True)
class Alignment:
    """Each character of a text with its start and duration in ms, from the start of the audio it goes with."""

    chars: list[str]
    starts_ms: list[int]
    durations_ms: list[int]

    @property
    def duration_ms(self) -> int:
        """The length of the audio it covers (where its last character ends)."""
        return self.starts_ms[-1] + self.durations_ms[-1] if self.chars else 0

    def websocket(self) -> dict:
        """ElevenLabs' WebSocket form."""
        return {"chars": self.chars, "charStartTimesMs": self.starts_ms, "charDurationsMs": self.durations_ms}

    def http(self, offset_ms: int = 0) -> dict:
        """ElevenLabs' HTTP form (seconds, start and end), `offset_ms` after the start of the response."""
        return {
            "characters": self.chars,
            "character_start_times_seconds": [(offset_ms + s) / 1000 for s in self.starts_ms],
            "character_end_times_seconds": [
                (offset_ms + s + d) / 1000 for s, d in zip(self.starts_ms, self.durations_ms)
            ],
        }


def estimate(text: str, duration_ms: int) -> Alignment:
    """Every character of `text` over `duration_ms` of audio, by weight (see the module's docstring). Times are
    whole ms that never go backwards, and the last character ends at exactly `duration_ms`."""
    chars = list(text)
    weights = [_weight(c) for c in chars]
    total = sum(weights) or float(len(chars) or 1)
    if not sum(weights):
        weights = [1.0] * len(chars)
    edges, acc = [0], 0.0
    for weight in weights:
        acc += weight
        edges.append(round(duration_ms * acc / total))
    edges[-1] = duration_ms if chars else 0
    return Alignment(chars, edges[:-1], [b - a for a, b in zip(edges, edges[1:])])
