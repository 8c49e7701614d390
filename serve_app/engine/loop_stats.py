"""What the frame loop costs on the host: steps, frames read, host synchronisations and the time spent in
them, the time the MLX thread spends in Python, and the time it takes to build each frame's graph. The
benchmark reports these per frame; they are cheap enough (two clock reads per step, per synchronisation
and per frame built) to stay on in serving."""

from __future__ import annotations

import statistics
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class LoopStats:
    steps: int = 0
    launches: int = 0  # batch frames launched on the device
    frames: int = 0  # batch frames read on the host (one per step that produced a frame)
    syncs: int = 0  # host synchronisations: frame reads, prefill evaluations, Mimi reads
    sync_s: float = 0.0  # time blocked in them (waiting for the device)
    frame_wait_s: float = 0.0  # of which reading frames
    step_s: float = 0.0  # time inside steps; step_s - sync_s is the MLX thread's own Python and launch time
    # Host time to build each recent frame's graph, up to its launch (nothing evaluated): on a GPU the device
    # waits for this unless the frame before it is still running.
    builds_s: deque = field(default_factory=lambda: deque(maxlen=256))

    @contextmanager
    def step(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.steps += 1
            self.step_s += time.perf_counter() - started

    @contextmanager
    def build(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.builds_s.append(time.perf_counter() - started)

    @contextmanager
    def sync(self, frame: bool = False):
        started = time.perf_counter()
        try:
            yield
        finally:
            waited = time.perf_counter() - started
            self.syncs += 1
            self.sync_s += waited
            if frame:
                self.frame_wait_s += waited

    def per_frame(self) -> dict:
        frames = max(1, self.frames)
        return {
            "frames": self.frames,
            "syncs_per_frame": round(self.syncs / frames, 2),
            "host_ms_per_frame": round(1000 * (self.step_s - self.sync_s) / frames, 3),
            "sync_wait_ms_per_frame": round(1000 * self.sync_s / frames, 3),
            "frame_wait_ms_per_frame": round(1000 * self.frame_wait_s / frames, 3),
            "step_ms_per_frame": round(1000 * self.step_s / frames, 3),
            # the median: a frame of a shape met for the first time also traces (compiled) its graph
            "graph_build_ms_per_frame": round(1000 * statistics.median(self.builds_s), 3) if self.builds_s else None,
        }
