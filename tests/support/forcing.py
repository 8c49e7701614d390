"""Forcing what random weights never do by themselves: codes at the depth decoder's output (an end-of-speech
frame, a loop), and quiet PCM at Mimi's output (the tiny Mimi decodes every code to noise near -5 dBFS, so
no code sequence is quiet). In-process only: the engine's scheduler and Serve's local testing mode."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

import serve_app.engine.scheduler as scheduler_module
from serve_app.core.constants import SAMPLES_PER_FRAME


def force_codes(engine, monkeypatch, change) -> None:
    """`change(call, codes)` may rewrite the codes (rows, K) of the `call`-th frame (from 1; speculative frames
    count too) by returning new ones; None keeps them."""
    frame_step, calls = engine.frame_step, [0]

    def wrapped(*args):
        codes, *rest = frame_step(*args)
        calls[0] += 1
        changed = change(calls[0], np.array(codes))
        return (codes if changed is None else mx.array(changed)), *rest

    wrapped.compiled, wrapped.prepare = frame_step.compiled, frame_step.prepare
    monkeypatch.setattr(engine, "frame_step", wrapped)


def end_of_speech_at(engine, monkeypatch, *calls: int, row: int = 0) -> None:
    """The depth decoder's frames number `calls` come out as CSM's all-zero end-of-speech frame for `row`."""

    def change(call, codes):
        if call in calls:
            codes[row] = 0
            return codes
        return None

    force_codes(engine, monkeypatch, change)


def quiet_frames(monkeypatch, start: int, stop: int, level: float = 1e-3) -> None:
    """Mimi's output for every stream's frames start..stop-1 (counted per stream) scaled to near silence
    (-65 dBFS)."""
    decode = scheduler_module.decode_states

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

    monkeypatch.setattr(scheduler_module, "decode_states", wrapped)
