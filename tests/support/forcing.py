"""Forcing what random weights never do by themselves, for the guards' tests: quiet PCM at Mimi's output
(the tiny Mimi decodes every code to noise near -5 dBFS, so no code sequence is quiet)."""

from __future__ import annotations

import serve_app.engine.scheduler as scheduler_module
from serve_app.core.constants import SAMPLES_PER_FRAME


def quiet_frames(monkeypatch, start: int, stop: int, level: float = 1e-3) -> None:
    """Mimi's output for every stream's frames start..stop-1 (counted per stream) scaled to near silence
    (-65 dBFS). In-process only: the engine's scheduler and Serve's local testing mode."""
    decode = scheduler_module.decode_streams

    def wrapped(streams, codes, stream=None):
        first = [s.frames for s in streams]
        out = []
        for begin, pcm in zip(first, decode(streams, codes, stream)):
            pcm = pcm.copy()
            for f in range(len(pcm) // SAMPLES_PER_FRAME):
                if start <= begin + f < stop:
                    pcm[f * SAMPLES_PER_FRAME : (f + 1) * SAMPLES_PER_FRAME] *= level
            out.append(pcm)
        return out

    monkeypatch.setattr(scheduler_module, "decode_streams", wrapped)
