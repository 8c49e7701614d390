"""`python -m ops.bench.wyoming`: Home Assistant's Wyoming against HTTP, side by side on one server.

    python -m ops.bench.wyoming                        # tiny checkpoint, ~a minute
    python -m ops.bench.wyoming --checkpoint /path/to/csm-1b --rounds 10

One real server (the launcher, WYOMING_PORT on, a frame cap so every request generates the same frames) and
the same sentence and voice, in rounds that alternate the three clients so drift hits them alike:

- HTTP: the OpenAI route streaming `pcm` on a kept-alive connection, time to its first byte;
- Wyoming one-shot: a new connection (as Home Assistant opens one), `synthesize`, time to the first
  `audio-chunk`;
- Wyoming streaming: `synthesize-start`, then the sentence without its end, then the text that completes it
  (the next sentence's first word, as an LLM's stream does); time from that last chunk to the first
  `audio-chunk`.

Targets (issue 33): one-shot within 1.1x of HTTP's first byte; streaming within HTTP's first byte + 50 ms.
Results: results/bench/<machine>/wyoming-<checkpoint>.{json,md}.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
from wyoming.client import AsyncTcpClient
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from ops.bench import http_first_byte as first_byte
from ops.bench import measure_on_server, save_side_bench, side_bench_options
from serve_app.tools.local_server import free_port

SENTENCE = "The quick brown fox jumps over the lazy dog."
VOICE = "conversational"


async def _first_chunk(client: AsyncTcpClient) -> None:
    while (event := await asyncio.wait_for(client.read_event(), 120)) is not None:
        if event.type == "audio-chunk":
            return
        if event.type == "error":
            raise RuntimeError(event.data)
    raise RuntimeError("the connection ended before any audio")


async def _drain(client: AsyncTcpClient, until: str) -> None:
    while (event := await asyncio.wait_for(client.read_event(), 120)) is not None and event.type != until:
        pass


async def wyoming_one_shot(port: int) -> float:
    started = time.perf_counter()
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Synthesize(text=SENTENCE, voice=SynthesizeVoice(name=VOICE)).event())
        await _first_chunk(client)
        first = time.perf_counter() - started
        await _drain(client, "audio-stop")
    return first


async def wyoming_stream(port: int) -> float:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name=VOICE)).event())
        await client.write_event(SynthesizeChunk(text=SENTENCE).event())  # its end is not known to be one yet
        started = time.perf_counter()
        await client.write_event(SynthesizeChunk(text=" And").event())
        await _first_chunk(client)
        first = time.perf_counter() - started
        await client.write_event(SynthesizeStop().event())
        await _drain(client, "synthesize-stopped")
    return first


def http_first_byte(client: httpx.Client, url: str) -> float:
    body = {"model": "csm-1b", "input": SENTENCE, "voice": VOICE, "response_format": "pcm"}
    return first_byte(client, f"{url}/v1/audio/speech", body)


def measure(url: str, port: int, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"http": [], "wyoming_one_shot": [], "wyoming_stream": []}
    with httpx.Client(timeout=120) as client:
        for warm in range(rounds + 1):  # the first round warms every path and is not counted
            row = {
                "http": http_first_byte(client, url),
                "wyoming_one_shot": asyncio.run(wyoming_one_shot(port)),
                "wyoming_stream": asyncio.run(wyoming_stream(port)),
            }
            if warm:
                for key, value in row.items():
                    times[key].append(value)
    return times


def summarize(times: dict[str, list[float]]) -> dict:
    median = {key: round(1000 * statistics.median(values), 1) for key, values in times.items()}
    http = median["http"]
    return {
        "median_ms": median,
        "all_ms": {key: [round(1000 * v, 1) for v in values] for key, values in times.items()},
        "one_shot_ratio": round(median["wyoming_one_shot"] / http, 3),
        "stream_over_http_ms": round(median["wyoming_stream"] - http, 1),
        "targets": {
            "one_shot_within_1.1x": median["wyoming_one_shot"] <= 1.1 * http,
            "stream_within_http_plus_50ms": median["wyoming_stream"] <= http + 50,
        },
    }


def render(result: dict, machine: dict) -> str:
    median = result["median_ms"]
    lines = [
        f"# Wyoming against HTTP, first audio ({result['checkpoint']}, {machine['name']})",
        "",
        f"{result['date']}, `{result['command']}`; {result['rounds']} rounds, {result['frames']} frames per request,",
        f'"{SENTENCE}", voice {VOICE}. Medians:',
        "",
        "| Client | First audio (ms) |",
        "|---|---|",
        f"| HTTP, streamed pcm (first byte) | {median['http']} |",
        f"| Wyoming one-shot (new connection to first audio-chunk) | {median['wyoming_one_shot']} |",
        f"| Wyoming streaming (sentence's completing chunk to first audio-chunk) | {median['wyoming_stream']} |",
        "",
        f"One-shot / HTTP: {result['one_shot_ratio']} (target <= 1.1); streaming - HTTP: "
        f"{result['stream_over_http_ms']} ms (target <= 50). Targets met: {result['targets']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    args, name, checkpoint = side_bench_options(__doc__, argv, frames=12)
    port = free_port()
    env = {"WYOMING_PORT": str(port)}
    times = measure_on_server(checkpoint, args.frames, lambda server: measure(server.base_url, port, args.rounds), env)
    result = {"checkpoint": name, "rounds": args.rounds, "frames": args.frames, **summarize(times)}
    save_side_bench(result, "ops.bench.wyoming", f"wyoming-{name}", args.out, render, argv)


if __name__ == "__main__":
    main()
