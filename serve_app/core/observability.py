"""Per-request log lines and Ray Serve custom metrics.

Every speech request ends in exactly one log line (request id, voice, format, characters, time to first
byte, audio seconds, real-time factor, status) and one update of the metrics below. Ray exports them as
`ray_sesame_tts_*` on each node's metrics port, where Prometheus (and the dashboard's Grafana panels)
read them.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

from serve_app.core.constants import FRAME_RATE, LOGGER_NAME
from serve_app.core.messages import Usage

logger = logging.getLogger(LOGGER_NAME)

TTFB_BUCKETS = [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0]
RTF_BUCKETS = [0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 50.0, 100.0]


@functools.cache
def metrics() -> Optional[dict]:
    """The metric objects of this process, created once; None outside a Ray worker (plain unit tests)."""
    import ray

    if not ray.is_initialized():
        return None
    from ray.serve.metrics import Counter, Gauge, Histogram

    tags = ("format", "voice", "protocol")
    return {
        "ttfb": Histogram(
            "sesame_tts_time_to_first_byte_seconds",
            "Time from request to first audio byte.",
            boundaries=TTFB_BUCKETS,
            tag_keys=tags,
        ),
        "rtf": Histogram(
            "sesame_tts_real_time_factor",
            "Response time divided by audio duration (<1 is faster than real time).",
            boundaries=RTF_BUCKETS,
            tag_keys=tags,
        ),
        "audio": Counter("sesame_tts_audio_seconds", "Seconds of audio delivered.", tag_keys=tags),
        "requests": Counter("sesame_tts_requests", "Speech requests by outcome.", tag_keys=("status", *tags)),
        "guards": Counter(
            "sesame_tts_guards",
            "Times a guard against CSM's failure modes acted (silent_tail, loop, too_short, empty).",
            tag_keys=("guard", *tags),
        ),
        "queue": Gauge("sesame_tts_queue_depth", "Requests waiting for the model."),
        "batch": Gauge("sesame_tts_active_batch_size", "Requests the model is generating right now."),
    }


def set_model_load(queued: int, active: int) -> None:
    """The model replica's queue depth and active batch size."""
    m = metrics()
    if m is not None:
        m["queue"].set(queued)
        m["batch"].set(active)


@dataclass
class RequestRecord:
    """One speech request, from arrival to its single log line."""

    request_id: str
    voice: str = "-"
    fmt: str = "-"
    characters: int = 0
    speed: float = 1.0
    protocol: str = "http"  # the listener it came through: http (OpenAI and ElevenLabs) or wyoming
    started: float = field(default_factory=time.perf_counter)
    first_byte: Optional[float] = None
    usage: Usage = field(default_factory=Usage)
    done: bool = False
    # A request that is one piece of a longer one (a sentence of a WebSocket context): it logs nothing and
    # counts in no metric itself; what it generated is added to the whole's record, which has the log line.
    part_of: Optional[RequestRecord] = None

    def add(self, part: RequestRecord) -> None:
        """A part's tokens and guards into this whole (its first part's context, its voice)."""
        usage = self.usage
        if not usage.output_tokens and not usage.input_tokens:
            usage.context_positions = part.usage.context_positions
        usage.input_tokens += part.usage.input_tokens
        usage.output_tokens += part.usage.output_tokens
        for guard, count in part.usage.guards.items():
            usage.guards[guard] = usage.guards.get(guard, 0) + count
        if self.voice == "-":
            self.voice = part.voice

    def mark_first_byte(self) -> None:
        self.first_byte = time.perf_counter() - self.started

    @property
    def audio_seconds(self) -> float:
        return self.usage.output_tokens / FRAME_RATE / self.speed

    def finish(self, status: str) -> None:
        """Log the request and update the metrics; later calls do nothing."""
        if self.done:
            return
        self.done = True
        if self.part_of is not None:
            self.part_of.add(self)
            return
        total = time.perf_counter() - self.started
        rtf = total / self.audio_seconds if self.audio_seconds else None
        ttfb = f"{1000 * self.first_byte:.0f}" if self.first_byte is not None else "-"
        logger.info(
            "request id=%s voice=%s format=%s chars=%d context=%d ttfb_ms=%s audio_s=%.2f rtf=%s total_s=%.2f"
            " status=%s guards=%s protocol=%s",
            self.request_id,
            self.voice,
            self.fmt,
            self.characters,
            self.usage.context_positions,
            ttfb,
            self.audio_seconds,
            f"{rtf:.2f}" if rtf is not None else "-",
            total,
            status,
            ",".join(f"{name}:{count}" for name, count in sorted(self.usage.guards.items())) or "-",
            self.protocol,
        )
        m = metrics()
        if m is None:
            return
        tags = {"format": self.fmt, "voice": self.voice, "protocol": self.protocol}
        m["requests"].inc(tags={"status": status, **tags})
        for guard, count in self.usage.guards.items():
            m["guards"].inc(count, tags={"guard": guard, **tags})
        if self.first_byte is not None:
            m["ttfb"].observe(self.first_byte, tags=tags)
        if self.audio_seconds:
            m["audio"].inc(self.audio_seconds, tags=tags)
            m["rtf"].observe(rtf, tags=tags)
