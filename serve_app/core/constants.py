"""Facts every layer shares: the codec's rates, the model's name, the logger's name, how long a stop waits.

They are not settings (nothing here is tunable; IDLE_RAY_SERVE holds defaults for Ray's own variables, which an
operator may set instead), and they live apart from `settings.py` so that a module
that needs a sample rate does not have to load the server's whole configuration.
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# The Mimi codec's fixed output: 24 kHz mono, one CSM frame per 80 ms.
SAMPLE_RATE = 24_000
FRAME_RATE = 12.5
SAMPLES_PER_FRAME = int(SAMPLE_RATE / FRAME_RATE)

# A slow speaking rate (characters per second, ~110 words a minute; conversational speech is 14-16): a
# chunk's default frame cap allows its text this long (plus MAX_AUDIO_BASE_S), and an end-of-speech before
# a third of it is too early (engine/guards.py).
SLOW_CHARS_PER_S = 10.0

MODEL_NAME = "csm-1b"

# Every module logs under this one name (configured once per process by logs.configure_logging).
LOGGER_NAME = "sesame_tts"

# Stopping, in one place: the service's drain, Serve's own shutdown, and the model replica's grace period.
STOP_GRACE_S = 40  # in-flight responses get this long to finish after a stop
STOP_KILL_AFTER_S = 15  # then `serve run`'s own shutdown gets this long before everything is killed

# What an idle server costs (a background service waits most of its life): Serve's controller runs its control
# loop every 0.1 s and each replica and handle flushes its cached metrics every 0.1 s; every 0.5 s and 1 s
# suffice (a replica's death is seen 0.4 s later; Prometheus scrapes every 10-15 s), and an idle server uses about
# a quarter less CPU (results/bench/<machine>/history.md). Set for the Ray node Serve runs on: the launcher's
# own alone, the head's `ray start` in a cluster; an operator's value wins.
IDLE_RAY_SERVE = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}
