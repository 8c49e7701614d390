"""The comparison the batching, frame-loop and KV-reuse tests use (tests/support/backend.py), in both of its modes:
what it accepts where a backend's rows depend on their batch must still catch a request that went wrong."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.core.messages import Usage
from tests.support import backend


def _speech(frames: int, seed: int, scale: float = 3000.0) -> tuple[bytes, Usage]:
    pcm = (np.random.default_rng(seed).normal(0, scale, frames * 1920)).astype("<i2").tobytes()
    return pcm, Usage(input_tokens=10, output_tokens=frames)


@pytest.mark.parametrize("independent", [True, False], ids=["rows-independent", "rows-depend-on-batch"])
def test_same_speech_catches_what_a_listener_would(monkeypatch, independent):
    monkeypatch.setattr(backend, "ROWS_INDEPENDENT", independent)
    want = _speech(10, 0)
    backend.assert_same_speech(want, want)
    other_bits = _speech(10, 1)  # same frames and length, other samples
    if independent:
        with pytest.raises(AssertionError):
            backend.assert_same_speech(other_bits, want)
    else:
        backend.assert_same_speech(other_bits, want)
    for wrong in (_speech(9, 0), _speech(10, 0, scale=1.0), (want[0][:-2], want[1])):  # short, silent, cut
        with pytest.raises(AssertionError):
            backend.assert_same_speech(wrong, want)


@pytest.mark.parametrize("independent", [True, False], ids=["rows-independent", "rows-depend-on-batch"])
def test_same_pcm_is_exact_or_within_40_db(monkeypatch, independent):
    monkeypatch.setattr(backend, "ROWS_INDEPENDENT", independent)
    want = np.random.default_rng(0).normal(0, 0.3, 4000).astype(np.float32)
    close = want + np.float32(1e-6)
    if independent:
        with pytest.raises(AssertionError):
            backend.assert_same_pcm(close, want)
    else:
        backend.assert_same_pcm(close, want)
    with pytest.raises(AssertionError):
        backend.assert_same_pcm(want + 0.1, want)  # ~10 dB: another sound
