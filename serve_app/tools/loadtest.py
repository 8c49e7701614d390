"""A bounded load test against a local server: `python -m serve_app.tools.loadtest --clients 24 --requests 200`.

N concurrent clients send M speech requests in all (mixed formats, text lengths, raw and SSE streams, and
some clients that hang up after the first bytes). Like the openai SDK, a client retries a 429 after its
Retry-After (`--retries`, default 2). Every 200 answer is decoded with ffmpeg; the report counts each
request's final outcome (completed, 429, other errors, truncated and invalid audio), every attempt's 429s,
and gives p50/p95/p99 time to first byte. The target: every request ends as valid audio or a 429 (or a
deliberate hang-up after valid first bytes).

`--soak N` instead sends N requests one after another and samples the model replica's memory from
/health after each, to show that memory stays flat. Loopback only; every run is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import logging
import random
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import httpx

from serve_app.audio.ffmpeg import find_ffmpeg
from serve_app.core.constants import SAMPLE_RATE
from serve_app.core.formats import OPENAI_FORMATS as ALL_FORMATS

logger = logging.getLogger("sesame_tts.loadtest")

FORMATS = list(ALL_FORMATS)
TEXTS = [
    "Hello there.",
    "Your meeting with Dana moved to three thirty, in the small room.",
    "Here is the summary you asked for. The build passed on every machine, the release notes are written, "
    "and the only open question is whether we ship on Thursday or wait for the translation to land.",
]
OUTCOMES = ("ok", "rate_limited", "hung_up", "error", "truncated", "invalid")
MAX_REQUESTS = 10_000
MAX_SECONDS = 3_600


@dataclass
class Result:
    outcome: str
    fmt: str
    mode: str
    status: Optional[int] = None
    ttfb_s: Optional[float] = None
    total_s: float = 0.0
    audio_s: float = 0.0
    detail: str = ""
    retry_after: float = 0.0


def require_loopback(url: str) -> None:
    """Refuse any target that is not this machine: this tool generates load."""
    host = urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise SystemExit(f"cannot resolve {host!r}: {exc}") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"refusing to load-test {host!r}: only loopback addresses are allowed")


def decoded_seconds(ffmpeg: str, data: bytes, fmt: str) -> float:
    """Decode `data` fully with ffmpeg; its duration in seconds, or ValueError if ffmpeg finds a fault."""
    if fmt == "wav":
        data = _wav_payload(data)
    if fmt in ("pcm", "wav"):
        if len(data) % 2:
            raise ValueError("odd number of bytes in s16le PCM")
        return len(data) / 2 / SAMPLE_RATE
    proc = subprocess.run(
        [
            ffmpeg,
            "-hide_banner",
            "-v",
            "error",
            "-xerror",
            "-i",
            "pipe:0",
            "-f",
            "s16le",
            "-ac",
            "1",
            "-ar",
            str(SAMPLE_RATE),
            "pipe:1",
        ],
        input=data,
        capture_output=True,
        timeout=60,
    )
    if proc.returncode != 0 or proc.stderr.strip():
        raise ValueError(proc.stderr.decode(errors="replace").strip()[-200:] or f"ffmpeg exited {proc.returncode}")
    return len(proc.stdout) / 2 / SAMPLE_RATE


def _wav_payload(data: bytes) -> bytes:
    """The samples of a streamed WAV (its sizes are 0xFFFFFFFF, so ffmpeg's demuxer flags the last short read
    as corrupt): the header must be 16-bit mono PCM at 24 kHz, and the data chunk runs to the end."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    position = 12
    while position + 8 <= len(data):
        chunk, size = data[position : position + 4], int.from_bytes(data[position + 4 : position + 8], "little")
        body = position + 8
        if chunk == b"fmt ":
            tag, channels, rate = (
                int.from_bytes(data[body + a : body + b], "little") for a, b in ((0, 2), (2, 4), (4, 8))
            )
            bits = int.from_bytes(data[body + 14 : body + 16], "little")
            if (tag, channels, rate, bits) != (1, 1, SAMPLE_RATE, 16):
                raise ValueError(f"unexpected WAV format {(tag, channels, rate, bits)}")
        elif chunk == b"data":
            return data[body:]
        position = body + size + (size & 1)
    raise ValueError("WAV without a data chunk")


def _is_openai_error(response: httpx.Response) -> bool:
    try:
        error = response.json()["error"]
        return set(error) == {"message", "type", "param", "code"}
    except (ValueError, KeyError, TypeError):
        return False


def _sse_audio(text: str) -> tuple[bytes, bool]:
    """The audio in an SSE body, and whether it ended properly (done event, then [DONE])."""
    audio, done, finished = b"", False, False
    for line in text.splitlines():
        if not line.startswith("data: "):
            continue
        payload = line[6:]
        if payload == "[DONE]":
            finished = done
            continue
        event = json.loads(payload)
        if event.get("type") == "speech.audio.delta":
            audio += base64.b64decode(event["audio"])
        elif event.get("type") == "speech.audio.done":
            done = True
        else:
            return audio, False
    return audio, finished


class LoadTest:
    def __init__(self, base_url: str, api_key: Optional[str], ffmpeg: str, seed: int, hang_up: float, sse: float):
        self.api = base_url.rstrip("/") + "/v1"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.ffmpeg = ffmpeg
        self.random = random.Random(seed)
        self.hang_up = hang_up
        self.sse = sse
        self.decoders = asyncio.Semaphore(2)  # decoding must not starve the server of this machine's CPU

    def plan(self) -> tuple[dict, str]:
        """One request body and its mode: 'audio', 'sse' or 'hang_up'."""
        r = self.random.random()
        mode = "hang_up" if r < self.hang_up else ("sse" if r < self.hang_up + self.sse else "audio")
        body = {"model": "csm-1b", "input": self.random.choice(TEXTS), "response_format": self.random.choice(FORMATS)}
        if mode == "sse":
            body["stream_format"] = "sse"
        return body, mode

    async def one(self, client: httpx.AsyncClient, body: dict, mode: str) -> Result:
        result = Result("error", body["response_format"], mode)
        started = time.perf_counter()
        data = b""
        try:
            async with client.stream("POST", f"{self.api}/audio/speech", json=body, headers=self.headers) as response:
                result.status = response.status_code
                if response.status_code != 200:
                    await response.aread()
                    ok_429 = response.status_code == 429 and response.headers.get("retry-after", "").isdigit()
                    result.outcome = "rate_limited" if ok_429 and _is_openai_error(response) else "error"
                    result.retry_after = float(response.headers["retry-after"]) if ok_429 else 0.0
                    result.detail = response.text[:200]
                    return result
                async for piece in response.aiter_raw():
                    if result.ttfb_s is None:
                        result.ttfb_s = time.perf_counter() - started
                    data += piece
                    if mode == "hang_up":
                        result.outcome = "hung_up"
                        return result
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            result.outcome, result.detail = "truncated", f"{type(exc).__name__}: {exc}"
            return result
        except httpx.HTTPError as exc:
            result.detail = f"{type(exc).__name__}: {exc}"
            return result
        finally:
            result.total_s = time.perf_counter() - started
        return await self.validate(result, data, mode)

    async def validate(self, result: Result, data: bytes, mode: str) -> Result:
        if mode == "sse":
            data, finished = _sse_audio(data.decode(errors="replace"))
            if not finished:
                result.outcome, result.detail = "truncated", "SSE ended without speech.audio.done and [DONE]"
                return result
        async with self.decoders:
            try:
                result.audio_s = await asyncio.to_thread(decoded_seconds, self.ffmpeg, data, result.fmt)
            except ValueError as exc:
                result.outcome, result.detail = "invalid", str(exc)
                return result
        result.outcome = "ok" if result.audio_s > 0 else "invalid"
        return result

    async def run(self, clients: int, requests: int, max_seconds: float, retries: int, max_retry_wait: float):
        """Results of every attempt (a 429 retried counts once per try) and of every request (its last try)."""
        attempts: list[Result] = []
        results: list[Result] = []
        deadline = time.monotonic() + max_seconds
        remaining = requests

        async def client_loop(client: httpx.AsyncClient) -> None:
            nonlocal remaining
            while remaining > 0 and time.monotonic() < deadline:
                remaining -= 1
                body, mode = self.plan()
                for attempt in range(retries + 1):
                    result = await self.one(client, body, mode)
                    attempts.append(result)
                    if result.outcome != "rate_limited" or attempt == retries:
                        break
                    # As the openai SDK does: wait as told (jittered, at most max_retry_wait), then retry.
                    await asyncio.sleep(self.random.uniform(0.5, 1.0) * min(result.retry_after, max_retry_wait))
                results.append(result)

        timeout = httpx.Timeout(120, connect=10)
        limits = httpx.Limits(max_connections=clients * 2)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return results, attempts


def summarize(results: list[Result], attempts: list[Result], wall_s: float) -> dict:
    counts = {name: sum(r.outcome == name for r in results) for name in OUTCOMES}
    counts["attempts"] = len(attempts)
    counts["attempts_429"] = sum(r.outcome == "rate_limited" for r in attempts)
    ttfbs = sorted(r.ttfb_s for r in results if r.ttfb_s is not None)

    def pct(p: float) -> Optional[float]:
        return round(1000 * ttfbs[min(len(ttfbs) - 1, int(p * len(ttfbs)))], 1) if ttfbs else None

    return {
        "requests": len(results),
        **counts,
        "ttfb_ms": {"p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99)},
        "wall_s": round(wall_s, 2),
        "audio_s": round(sum(r.audio_s for r in results), 2),
        "failures": [asdict(r) for r in results if r.outcome in ("error", "truncated", "invalid")][:20],
    }


def soak(base_url: str, count: int, api_key: Optional[str], ffmpeg: str) -> dict:
    """`count` requests one after another; the model replica's memory after each (from /health)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    samples, bad = [], []
    with httpx.Client(timeout=120) as client:
        for i in range(count):
            fmt = FORMATS[i % len(FORMATS)]
            # The two shorter texts: a leak shows per request, so more requests per minute find it sooner.
            body = {"input": TEXTS[i % 2], "response_format": fmt}
            response = client.post(f"{base_url}/v1/audio/speech", json=body, headers=headers)
            try:
                if response.status_code != 200 or decoded_seconds(ffmpeg, response.content, fmt) <= 0:
                    bad.append(f"request {i}: HTTP {response.status_code}")
            except ValueError as exc:
                bad.append(f"request {i}: {exc}")
            health = client.get(f"{base_url}/health").json()
            memory = health["model"]["memory"]
            samples.append(
                {
                    "request": i + 1,
                    "rss_mb": memory["rss_mb"],
                    "mlx_active_mb": memory["mlx_active_mb"],
                    "ffmpeg_running": health.get("encoders_running"),
                }
            )
    warm = samples[min(9, len(samples) - 1)]  # after warm-up: the 10th request
    peak_rss = max(s["rss_mb"] for s in samples[9:] or samples)
    return {
        "requests": count,
        "failed": bad,
        "rss_after_warmup_mb": warm["rss_mb"],
        "rss_max_mb": peak_rss,
        "rss_last_mb": samples[-1]["rss_mb"],
        "rss_growth_pct": round(100 * (peak_rss / warm["rss_mb"] - 1), 2),
        "curve": samples,
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.tools.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8880", help="server base URL (loopback only)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=100, help=f"requests in all (at most {MAX_REQUESTS})")
    parser.add_argument(
        "--max-seconds", type=float, default=600, help=f"stop issuing after this (at most {MAX_SECONDS})"
    )
    parser.add_argument(
        "--hang-up", type=float, default=0.1, help="share of clients that hang up after the first bytes"
    )
    parser.add_argument("--sse", type=float, default=0.2, help="share of requests that use stream_format=sse")
    parser.add_argument("--retries", type=int, default=2, help="retries after a 429 (the openai SDK's default: 2)")
    parser.add_argument(
        "--max-retry-wait",
        type=float,
        default=5.0,
        help="after a 429 a client waits Retry-After (jittered), at most this many seconds",
    )
    parser.add_argument("--soak", type=int, metavar="N", help="instead: N requests in a row, memory after each")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    require_loopback(args.url)
    ffmpeg, info = find_ffmpeg("ffmpeg")
    if ffmpeg is None:
        raise SystemExit(info)
    if args.soak:
        report = soak(args.url, min(args.soak, MAX_REQUESTS), args.api_key, ffmpeg)
        ok = not report["failed"]
    else:
        test = LoadTest(args.url, args.api_key, ffmpeg, args.seed, args.hang_up, args.sse)
        started = time.perf_counter()
        results, attempts = asyncio.run(
            test.run(
                max(1, args.clients),
                min(args.requests, MAX_REQUESTS),
                min(args.max_seconds, MAX_SECONDS),
                args.retries,
                args.max_retry_wait,
            )
        )
        report = summarize(results, attempts, time.perf_counter() - started)
        ok = report["error"] == report["truncated"] == report["invalid"] == 0
    report["args"] = {k: str(v) for k, v in vars(args).items() if k != "api_key"}
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    sys.stdout.write(json.dumps({k: v for k, v in report.items() if k != "curve"}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
