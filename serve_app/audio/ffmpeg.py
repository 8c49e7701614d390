"""ffmpeg command lines for each response format.

One ffmpeg process encodes one whole response, so every response is one continuous container. Input is
raw s16le 24 kHz mono on stdin, declared up front: with no probing (`-probesize 32 -analyzeduration 0`) and
packet flushing, ffmpeg emits output as soon as it has a frame, instead of holding the first mp3 byte
until the input ends. (`-fflags +nobuffer` on the input is not used: it made ffmpeg drop the last 40 ms of
every response, and the first byte came no sooner without it.)
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Optional

from serve_app.core.constants import SAMPLE_RATE
from serve_app.core.formats import FORMATS


def atempo_chain(speed: float) -> Optional[str]:
    """A pitch-preserving tempo filter for any speed in [0.25, 4]; atempo takes 0.5..2 per stage."""
    if abs(speed - 1.0) < 1e-6:
        return None
    stages = []
    while speed > 2.0:
        stages.append(2.0)
        speed /= 2.0
    while speed < 0.5:
        stages.append(0.5)
        speed /= 0.5
    stages.append(speed)
    return ",".join(f"atempo={s:.6g}" for s in stages)


def ffmpeg_command(ffmpeg: str, fmt: str, speed: float = 1.0) -> list[str]:
    tempo = atempo_chain(speed)
    return [
        ffmpeg,
        "-hide_banner",
        "-loglevel",
        "error",
        "-probesize",
        "32",
        "-analyzeduration",
        "0",
        "-f",
        "s16le",
        "-ar",
        str(SAMPLE_RATE),
        "-ac",
        "1",
        "-i",
        "pipe:0",
        *(["-filter:a", tempo] if tempo else []),
        # No metadata and no encoder tags: the WAV header is the plain 44 bytes (mp3: see formats.py).
        "-ar",
        str(FORMATS[fmt].sample_rate),
        "-ac",
        "1",
        "-map_metadata",
        "-1",
        "-fflags",
        "+bitexact",
        "-flags:a",
        "+bitexact",
        *FORMATS[fmt].ffmpeg_args(),
        "-flush_packets",
        "1",
        "pipe:1",
    ]


# Demuxers for the upload types OpenAI accepts (mpeg, wav, ogg, aac, flac, webm, mp4): nothing else is
# probed, so no playlist, concat list or image format can make ffmpeg open anything but its stdin.
UPLOAD_DEMUXERS = "mp3,wav,ogg,aac,flac,matroska,webm,mov,mp4,m4a,3gp,3g2,mj2"


# The MP4 family, the one upload type whose index (the `moov` atom) may come after the audio: ffmpeg's own
# default layout. A pipe cannot seek back to it, so such a file is decoded from a private temporary file.
MP4_DEMUXER = "mov"


def decode_command(ffmpeg: str, max_s: float, seekable: Optional[str] = None) -> list[str]:
    """Any accepted upload on stdin -> float32 24 kHz mono on stdout. Only the pipe protocol and the upload
    demuxers are allowed; the first audio stream is decoded and output stops at `max_s` seconds, so a small
    file that decodes to hours (a decompression bomb) costs at most that much.

    `seekable`: the path of an MP4-family upload written to a private temporary file instead. Then only the
    file protocol and the MP4 demuxer are allowed, with its external data references off (`-enable_drefs 0`,
    ffmpeg's default, made explicit): the one file is all ffmpeg may open."""
    if seekable is None:
        source = ["-protocol_whitelist", "pipe", "-format_whitelist", UPLOAD_DEMUXERS, "-i", "pipe:0"]
    else:
        source = ["-protocol_whitelist", "file", "-format_whitelist", UPLOAD_DEMUXERS, "-f", MP4_DEMUXER]
        source += ["-enable_drefs", "0", "-i", seekable]
    return [
        ffmpeg,
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "error",
        "-threads",
        "1",
        *source,
        "-map",
        "0:a:0",
        "-vn",
        "-sn",
        "-dn",
        "-t",
        f"{max_s:.3f}",
        "-ac",
        "1",
        "-ar",
        str(SAMPLE_RATE),
        "-f",
        "f32le",
        "pipe:1",
    ]


# What an upload's first bytes say it is, for the message when it cannot be decoded: (prefix, offset, kind).
_SIGNATURES = (
    (b"ftyp", 4, "an MP4/M4A container"),
    (b"RIFF", 0, "a RIFF (WAV) file"),
    (b"OggS", 0, "an Ogg file"),
    (b"fLaC", 0, "a FLAC file"),
    (b"ID3", 0, "an MP3 with an ID3 tag"),
    (b"\x1aE\xdf\xa3", 0, "a Matroska/WebM file"),
    (b"%PDF", 0, "a PDF document"),
    (b"\x89PNG", 0, "a PNG image"),
    (b"\xff\xd8\xff", 0, "a JPEG image"),
    (b"PK\x03\x04", 0, "a ZIP archive"),
)


def upload_kind(data: bytes) -> str:
    """What an upload looks like from its first bytes ("unrecognised data" when nothing matches)."""
    for prefix, offset, kind in _SIGNATURES:
        if data[offset : offset + len(prefix)] == prefix:
            return kind
    if len(data) > 1 and data[0] == 0xFF and data[1] & 0xF6 == 0xF0:
        return "AAC (ADTS) audio"
    if len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:
        return "MPEG audio"
    return "unrecognised data"


def is_mp4(data: bytes) -> bool:
    """An ISO base media file (mp4, m4a, mov, 3gp): its first box is `ftyp`."""
    return data[4:8] == b"ftyp"


def find_ffmpeg(name: str) -> tuple[Optional[str], str]:
    """(path, version line) of ffmpeg, or (None, reason) when it cannot be run."""
    path = shutil.which(name)
    if path is None:
        return None, f"ffmpeg not found (FFMPEG_PATH={name}); install it (brew install ffmpeg / apt-get install ffmpeg)"
    try:
        out = subprocess.run([path, "-hide_banner", "-version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"ffmpeg at {path} does not run: {exc}"
    if out.returncode != 0:
        return None, f"ffmpeg at {path} exited {out.returncode}"
    return path, out.stdout.splitlines()[0] if out.stdout else path
