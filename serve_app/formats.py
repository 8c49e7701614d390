"""The output formats: one registry that the request schema, the encoder and the load test read.

Each format is what the response carries (Content-Type), how ffmpeg makes it from the model's raw PCM
(codec, bitrate, muxer) and whether it is the model's own output (raw PCM passes through without ffmpeg
at normal speed). Adding a format here adds it to the API, the OpenAPI document and the load test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass(frozen=True)
class AudioFormat:
    name: str
    content_type: str
    codec: str
    muxer: str
    bitrate: Optional[str] = None  # constant bitrate of lossy codecs (the brief: mp3 64 kbps, opus 32 kbps)
    extra: tuple[str, ...] = ()  # further encoder/muxer arguments
    raw_pcm: bool = False  # exactly the model's output: s16le 24 kHz mono

    def ffmpeg_args(self) -> list[str]:
        """Encoder and muxer arguments for ffmpeg's output side."""
        return ["-c:a", self.codec, *(["-b:a", self.bitrate] if self.bitrate else []), *self.extra, "-f", self.muxer]


FORMATS: dict[str, AudioFormat] = {f.name: f for f in (
    # No ID3 tag and no Xing/LAME header: the first bytes are an MPEG frame (streams start at once).
    AudioFormat("mp3", "audio/mpeg", "libmp3lame", "mp3", "64k", ("-write_xing", "0", "-id3v2_version", "0")),
    AudioFormat("opus", "audio/opus", "libopus", "ogg", "32k", ("-page_duration", "20000")),
    AudioFormat("aac", "audio/aac", "aac", "adts", "64k"),
    AudioFormat("flac", "audio/flac", "flac", "flac", None, ("-sample_fmt", "s16")),
    # On a pipe ffmpeg writes 0xFFFFFFFF into the RIFF and data sizes (streaming WAV).
    AudioFormat("wav", "audio/wav", "pcm_s16le", "wav"),
    AudioFormat("pcm", "audio/pcm", "pcm_s16le", "s16le", raw_pcm=True),
)}

# The `response_format` values the API accepts, in the registry's order.
ResponseFormat = Literal[tuple(FORMATS)]  # type: ignore[valid-type]
