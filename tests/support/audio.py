"""Decoding and probing helpers: tests assert on the audio itself, through ffprobe and ffmpeg."""

from __future__ import annotations

import json
import subprocess

import numpy as np


def probe(data: bytes) -> dict:
    """ffprobe's view of an encoded response: {'format': {...}, 'stream': {...}}."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", "-i", "pipe:0"],
        input=data,
        capture_output=True,
        check=True,
    )
    info = json.loads(out.stdout)
    return {"format": info["format"], "stream": info["streams"][0]}


def decode(data: bytes, fmt: str | None = None) -> np.ndarray:
    """Decode any response body to float samples at 24 kHz mono (raw pcm needs fmt='pcm')."""
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    out = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", "pipe:0", "-f", "s16le", "-ar", "24000", "-ac", "1", "pipe:1"],
        input=data,
        capture_output=True,
        check=True,
    )
    return np.frombuffer(out.stdout, dtype="<i2").astype(np.float32) / 32768.0


RAW_MUXERS = ("s16le", "mulaw", "alaw")  # headerless: ffmpeg must be told what they are


def decode_format(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """Any registry format (OpenAI's or ElevenLabs') decoded to 24 kHz mono floats, and the sample rate the
    stream itself declares (for raw formats, the registry's)."""
    from serve_app.core.formats import FORMATS

    spec = FORMATS[fmt]
    if spec.muxer in RAW_MUXERS:
        source = ["-f", spec.muxer, "-ar", str(spec.sample_rate), "-ac", "1"]
        rate = spec.sample_rate
    else:
        source, rate = [], int(probe(data)["stream"]["sample_rate"])
    out = subprocess.run(
        ["ffmpeg", "-v", "error", *source, "-i", "pipe:0", "-f", "s16le", "-ar", "24000", "-ac", "1", "pipe:1"],
        input=data,
        capture_output=True,
        check=True,
    )
    return np.frombuffer(out.stdout, dtype="<i2").astype(np.float32) / 32768.0, rate


def duration(samples: np.ndarray, rate: int = 24000) -> float:
    return len(samples) / rate


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples)))) if len(samples) else 0.0
