"""Decoding and probing helpers: tests assert on the audio itself, through ffprobe and ffmpeg."""

from __future__ import annotations

import json
import subprocess

import numpy as np


def probe(data: bytes) -> dict:
    """ffprobe's view of an encoded response: {'format': {...}, 'stream': {...}}."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", "-i", "pipe:0"],
        input=data, capture_output=True, check=True,
    )
    info = json.loads(out.stdout)
    return {"format": info["format"], "stream": info["streams"][0]}


def decode(data: bytes, fmt: str | None = None) -> np.ndarray:
    """Decode any response body to float samples at 24 kHz mono (raw pcm needs fmt='pcm')."""
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    out = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", "pipe:0", "-f", "s16le", "-ar", "24000", "-ac", "1", "pipe:1"],
        input=data, capture_output=True, check=True,
    )
    return np.frombuffer(out.stdout, dtype="<i2").astype(np.float32) / 32768.0


def duration(samples: np.ndarray) -> float:
    return len(samples) / 24000.0


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples)))) if len(samples) else 0.0
