"""The output formats: one registry that the request schemas, the encoder and the load test read.

Each format is what the response carries (Content-Type), how ffmpeg makes it from the model's raw PCM
(codec, bitrate, muxer, output sample rate) and whether it is the model's own output (raw PCM at 24 kHz
passes through without ffmpeg at normal speed). OpenAI's `response_format` names come first; ElevenLabs'
`output_format` names (`mp3_44100_128`, `pcm_16000`, `ulaw_8000`, `opus_48000_64`, ...) follow, each a
codec at a rate (and bitrate) that ffmpeg resamples to. Adding a format here adds it to its API, the
OpenAPI document and the load test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from serve_app.core.constants import SAMPLE_RATE  # the Mimi codec's output, which every format is made from


@dataclass(frozen=True)
class AudioFormat:
    name: str
    content_type: str
    codec: str
    muxer: str
    bitrate: Optional[str] = None  # constant bitrate of lossy codecs (the brief: mp3 64 kbps, opus 32 kbps)
    extra: tuple[str, ...] = ()  # further encoder/muxer arguments
    raw_pcm: bool = False  # exactly the model's output: s16le 24 kHz mono
    sample_rate: int = SAMPLE_RATE  # of the output (ffmpeg resamples)
    dialect: Literal["openai", "elevenlabs"] = "openai"

    def ffmpeg_args(self) -> list[str]:
        """Encoder and muxer arguments for ffmpeg's output side."""
        return ["-c:a", self.codec, *(["-b:a", self.bitrate] if self.bitrate else []), *self.extra, "-f", self.muxer]


FORMATS: dict[str, AudioFormat] = {
    f.name: f
    for f in (
        # No ID3 tag and no Xing/LAME header: the first bytes are an MPEG frame (streams start at once).
        AudioFormat("mp3", "audio/mpeg", "libmp3lame", "mp3", "64k", ("-write_xing", "0", "-id3v2_version", "0")),
        AudioFormat("opus", "audio/opus", "libopus", "ogg", "32k", ("-page_duration", "20000")),
        AudioFormat("aac", "audio/aac", "aac", "adts", "64k"),
        AudioFormat("flac", "audio/flac", "flac", "flac", None, ("-sample_fmt", "s16")),
        # On a pipe ffmpeg writes 0xFFFFFFFF into the RIFF and data sizes (streaming WAV).
        AudioFormat("wav", "audio/wav", "pcm_s16le", "wav"),
        AudioFormat("pcm", "audio/pcm", "pcm_s16le", "s16le", raw_pcm=True),
    )
}


def _elevenlabs_formats() -> list[AudioFormat]:
    """ElevenLabs' output formats that ffmpeg makes: codec_rate[_kbps]."""
    mp3 = ("libmp3lame", "mp3", ("-write_xing", "0", "-id3v2_version", "0"))
    found = [
        AudioFormat(
            f"mp3_{rate}_{kbps}",
            "audio/mpeg",
            mp3[0],
            mp3[1],
            f"{kbps}k",
            mp3[2],
            sample_rate=rate,
            dialect="elevenlabs",
        )
        for rate, kbps in ((22050, 32), (24000, 48), (44100, 32), (44100, 64), (44100, 96), (44100, 128), (44100, 192))
    ]
    found += [
        AudioFormat(
            f"pcm_{rate}",
            "audio/pcm",
            "pcm_s16le",
            "s16le",
            raw_pcm=rate == SAMPLE_RATE,
            sample_rate=rate,
            dialect="elevenlabs",
        )
        for rate in (8000, 16000, 22050, 24000, 32000, 44100, 48000)
    ]
    found += [
        AudioFormat("ulaw_8000", "audio/basic", "pcm_mulaw", "mulaw", sample_rate=8000, dialect="elevenlabs"),
        AudioFormat("alaw_8000", "audio/x-alaw-basic", "pcm_alaw", "alaw", sample_rate=8000, dialect="elevenlabs"),
    ]
    found += [
        AudioFormat(
            f"opus_48000_{kbps}",
            "audio/ogg",
            "libopus",
            "ogg",
            f"{kbps}k",
            ("-page_duration", "20000"),
            sample_rate=48000,
            dialect="elevenlabs",
        )
        for kbps in (32, 64, 96, 128, 192)
    ]
    return found


FORMATS.update({f.name: f for f in _elevenlabs_formats()})
OPENAI_FORMATS = {name: f for name, f in FORMATS.items() if f.dialect == "openai"}
ELEVENLABS_FORMATS = {name: f for name, f in FORMATS.items() if f.dialect == "elevenlabs"}

# The `response_format` values OpenAI's API accepts, and ElevenLabs' `output_format` values, in order.
ResponseFormat = Literal[tuple(OPENAI_FORMATS)]  # type: ignore[valid-type]
ElevenLabsFormat = Literal[tuple(ELEVENLABS_FORMATS)]  # type: ignore[valid-type]
