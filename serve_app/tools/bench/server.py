"""The served part of the benchmark: the whole stack over HTTP, as a client sees it.

Starts `python -m serve_app.launch` on a free loopback port with a frame cap that makes every request
generate exactly the benchmark's frame count (random weights never end on their own), then measures
streamed requests per format, concurrency, and the memory of the model replica and of every server process.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import httpx

from serve_app.core.constants import FRAME_RATE, SAMPLE_RATE
from serve_app.core.processes import tree_rss_bytes
from serve_app.tools.bench.engine import TEXT, VOICE, percentile
from serve_app.tools.local_server import LocalServer


def process_tree_rss_mb(root_pid: int) -> tuple[float, int]:
    """Resident memory of a process and all its descendants, and how many processes that is."""
    rss, count = tree_rss_bytes(root_pid)
    return round(rss / 2**20, 1), count


def start_server(checkpoint: str, frames: int, max_batch: int, env: Optional[dict] = None) -> LocalServer:
    """The server under test, with a frame cap that makes every request generate exactly `frames`."""
    return LocalServer(
        Path(tempfile.mkdtemp(prefix="bench-server-")),
        {
            "MODEL_ID": checkpoint,
            "LOG_LEVEL": "warning",
            "MAX_BATCH_SIZE": str(max_batch),
            "MAX_QUEUED_REQUESTS": "32",
            # ceil((frames - 0.5) * 0.08 s * 12.5 frames/s) == frames, for any text.
            "MAX_AUDIO_BASE_S": str((frames - 0.5) / FRAME_RATE),
            "MAX_AUDIO_S_PER_CHAR": "0",
            **(env or {}),
        },
    )


def speech(client: httpx.Client, url: str, response_format: str, seed: int, voice: str = VOICE) -> dict:
    """One streamed request on a connected client (as SDK clients keep theirs): time to first byte, total
    time, and the bytes received. A new client per request would add ~20 ms of client set-up here."""
    body = {"model": "csm-1b", "input": TEXT, "voice": voice, "response_format": response_format, "seed": seed}
    t0 = time.perf_counter()
    first = None
    size = 0
    with client.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.read()[:300]!r}")
        timing = server_timing(response.headers.get("server-timing", ""))
        for chunk in response.iter_raw():
            if chunk and first is None:
                first = time.perf_counter() - t0
            size += len(chunk)
    return {"ttfb_s": first, "total_s": time.perf_counter() - t0, "bytes": size, "stages_ms": timing}


def server_timing(header: str) -> dict:
    """`Server-Timing: model;dur=61.2, encode;dur=1.9` -> {"model": 61.2, "encode": 1.9}."""
    out = {}
    for entry in filter(None, (e.strip() for e in header.split(","))):
        name, _, dur = entry.partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def server_part(
    checkpoint: str,
    frames: int,
    repeats: int,
    levels: list[int],
    formats: list[str],
    env: Optional[dict] = None,
    ready_timeout_s: float = 1800,
    voice: str = VOICE,
) -> dict:
    audio_s = frames / FRAME_RATE
    server = start_server(checkpoint, frames, max(levels), env)
    try:
        started = time.monotonic()
        server.wait_until(lambda r: r.status_code == 200, ready_timeout_s)
        result: dict = {
            "part": "server",
            "ready_s": round(time.monotonic() - started, 1),
            "frames": frames,
            "audio_s": audio_s,
            "formats": {},
            "concurrency": {},
        }
        client = httpx.Client(timeout=3600)
        speech(
            client, server.base_url, "pcm", 0, voice
        )  # warm the path (ffmpeg, handles, connection) like the engine's warm-up
        for fmt in formats:
            runs = [speech(client, server.base_url, fmt, seed, voice) for seed in range(repeats)]
            if fmt == "pcm":  # the stream is the raw PCM: its length proves the frame count
                expected = int(audio_s * SAMPLE_RATE) * 2
                bad = [r["bytes"] for r in runs if r["bytes"] != expected]
                if bad:
                    raise RuntimeError(f"pcm streams of {bad} bytes, expected {expected}")
            total = statistics.median(r["total_s"] for r in runs)
            stages = sorted({name for r in runs for name in r["stages_ms"]})
            result["formats"][fmt] = {
                "runs": runs,
                "ttfb_ms": round(1000 * statistics.median(r["ttfb_s"] for r in runs), 1),
                "total_s": round(total, 3),
                "rtf": round(total / audio_s, 3),
                # Where the first byte's time went, as the server measured it (its Server-Timing header).
                "stages_ms": {
                    name: round(statistics.median(r["stages_ms"].get(name, 0.0) for r in runs), 1) for name in stages
                },
            }
        for n in levels:
            runs: list[dict] = [{} for _ in range(n)]
            clients = [httpx.Client(timeout=3600) for _ in range(n)]
            for c in clients:
                c.get(f"{server.base_url}/v1/models")  # connected before the clock starts
            barrier = threading.Barrier(n)

            def one(i: int, barrier=barrier, runs=runs, clients=clients) -> None:
                barrier.wait()
                runs[i] = speech(
                    clients[i],
                    server.base_url,
                    "pcm",
                    100 + i,
                    voice,
                )

            threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            for c in clients:
                c.close()
            ttfb = [r["ttfb_s"] for r in runs]
            result["concurrency"][str(n)] = {
                "wall_s": round(wall, 3),
                "audio_s_per_s": round(n * audio_s / wall, 3),
                "ttfb_p50_ms": round(1000 * percentile(ttfb, 50), 1),
                "ttfb_p95_ms": round(1000 * percentile(ttfb, 95), 1),
            }
        health = server.health().json()
        rss_mb, processes = process_tree_rss_mb(server.proc.pid)
        result["memory"] = {
            "model_replica": health["model"]["memory"],
            "all_processes_rss_mb": rss_mb,
            "processes": processes,
        }
        result["model"] = {k: health["model"].get(k) for k in ("device", "dtype", "quantize", "max_batch_size")}
        return result
    finally:
        server.stop(timeout=60)
        shutil.rmtree(server.work, ignore_errors=True)
