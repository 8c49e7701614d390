"""`python -m ops.bench.agents`: ElevenLabs' multi-stream-input WebSocket against its HTTP stream, side by side.

    python -m ops.bench.agents                        # tiny checkpoint, ~a minute
    python -m ops.bench.agents --checkpoint /path/to/csm-1b --rounds 10

One real server (the launcher, a frame cap so every request generates the same frames), the same sentence and
voice, rounds alternating the clients so drift hits them alike:

- HTTP: POST /elevenlabs/v1/text-to-speech/{voice}/stream (pcm_24000) on a kept-alive connection, time to its
  first byte;
- WebSocket: a socket and context already open (as Pipecat keeps them, `auto_mode=true`), time from sending
  the sentence to its first audio message, and the longest gap between two audio messages of the context
  while it speaks that sentence and a long one after it;
- Barge-in: a long sentence unflushed, `close_context` once its first audio arrived; the audio that still
  arrives for it after the close was sent, in frame groups (GROUP_FRAMES frames of 80 ms).

Targets (issue 34): WebSocket first audio within 1.1x of HTTP's first byte; no gap between audio messages near
3 s (Pipecat's limit); after `close_context` on unflushed text, audio stops within two frame groups.
Results: results/bench/<machine>/agents-<checkpoint>.{json,md}.
"""

from __future__ import annotations

import base64
import json
import statistics
import time

import httpx
from websockets.sync.client import connect

from ops.bench import http_first_byte as first_byte
from ops.bench import measure_on_server, save_side_bench, side_bench_options
from serve_app.core.constants import SAMPLES_PER_FRAME
from serve_app.core.settings import Settings

SENTENCE = "The quick brown fox jumps over the lazy dog."
LONG = "This is a long sentence that would go on for quite a while if nobody stopped it at all. "
VOICE = "conversational"
GROUP_FRAMES = Settings().group_frames


def http_first_byte(client: httpx.Client, url: str) -> float:
    route = f"{url}/elevenlabs/v1/text-to-speech/{VOICE}/stream?output_format=pcm_24000"
    return first_byte(client, route, {"text": SENTENCE})


def _until(ws, context: str, audio_only: bool = False, arrivals: list | None = None) -> list[dict]:
    """Messages up to `context`'s first audio (`audio_only`) or its isFinal; `arrivals` gets the time each
    audio message of it arrived."""
    received = []
    while True:
        message = json.loads(ws.recv(timeout=120))
        if message.get("error"):
            raise RuntimeError(message)
        received.append(message)
        if arrivals is not None and message.get("audio") and message["contextId"] == context:
            arrivals.append(time.perf_counter())
        if audio_only and message.get("audio") or message.get("isFinal") and message["contextId"] == context:
            return received


def socket_round(url: str, index: int) -> tuple[float, float, float]:
    """(first audio after the sentence was sent, the longest gap between two of its audio messages, frame
    groups of audio after a barge-in's close_context)."""
    ws_url = url.replace("http://", "ws://", 1)
    route = f"{ws_url}/elevenlabs/v1/text-to-speech/{VOICE}/multi-stream-input?output_format=pcm_24000&auto_mode=true"
    with connect(route, max_size=2**24) as ws:
        speak, cut = f"s{index}", f"b{index}"
        ws.send(json.dumps({"text": " ", "context_id": speak}))
        started = time.perf_counter()
        ws.send(json.dumps({"text": SENTENCE + " ", "context_id": speak}))
        arrivals: list[float] = []
        _until(ws, speak, audio_only=True, arrivals=arrivals)
        first = time.perf_counter() - started
        ws.send(json.dumps({"text": LONG, "context_id": speak}))  # the reply's next sentence, as an LLM writes it
        ws.send(json.dumps({"context_id": speak, "flush": True}))
        ws.send(json.dumps({"context_id": speak, "close_context": True}))
        _until(ws, speak, arrivals=arrivals)
        gap = max((b - a for a, b in zip(arrivals, arrivals[1:])), default=0.0)
        ws.send(json.dumps({"text": " ", "context_id": cut}))
        ws.send(json.dumps({"text": LONG, "context_id": cut}))
        _until(ws, cut, audio_only=True)
        ws.send(json.dumps({"context_id": cut, "close_context": True}))
        after = sum(len(base64.b64decode(m["audio"])) for m in _until(ws, cut) if m.get("audio"))
        ws.send(json.dumps({"close_socket": True}))
    return first, gap, after / 2 / SAMPLES_PER_FRAME / GROUP_FRAMES


def measure(url: str, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"http": [], "websocket": [], "websocket_gap": [], "barge_in_groups": []}
    with httpx.Client(timeout=120) as client:
        for warm in range(rounds + 1):  # the first round warms every path and is not counted
            http = http_first_byte(client, url)
            first, gap, groups = socket_round(url, warm)
            if warm:
                times["http"].append(http)
                times["websocket"].append(first)
                times["websocket_gap"].append(gap)
                times["barge_in_groups"].append(groups)
    return times


def summarize(times: dict[str, list[float]]) -> dict:
    median = {key: round(1000 * statistics.median(times[key]), 1) for key in ("http", "websocket")}
    ratio = round(median["websocket"] / median["http"], 3)
    worst_groups = round(max(times["barge_in_groups"]), 2)
    worst_gap = round(1000 * max(times["websocket_gap"]), 1)
    return {
        "median_ms": median,
        "all_ms": {key: [round(1000 * v, 1) for v in times[key]] for key in ("http", "websocket", "websocket_gap")},
        "websocket_ratio": ratio,
        "longest_gap_ms": worst_gap,
        "barge_in_groups_after_close": [round(g, 2) for g in times["barge_in_groups"]],
        "targets": {
            "websocket_within_1.1x": ratio <= 1.1,
            "gaps_under_3s": worst_gap < 3000,
            "barge_in_within_2_groups": worst_groups <= 2,
        },
    }


def render(result: dict, machine: dict) -> str:
    median = result["median_ms"]
    return "\n".join(
        [
            f"# ElevenLabs' WebSocket against its HTTP stream ({result['checkpoint']}, {machine['name']})",
            "",
            f"{result['date']}, `{result['command']}`; {result['rounds']} rounds, {result['frames']} frames per "
            f'request (the cap), "{SENTENCE}", voice {VOICE}, pcm_24000. Medians:',
            "",
            "| Client | First audio (ms) |",
            "|---|---|",
            f"| HTTP `/stream` (first byte) | {median['http']} |",
            f"| WebSocket, auto_mode (sentence sent to first audio message) | {median['websocket']} |",
            "",
            f"WebSocket / HTTP: {result['websocket_ratio']} (target <= 1.1). The longest gap between two audio "
            f"messages of a context (two sentences, the second long), any round: {result['longest_gap_ms']} ms "
            "(Pipecat ends a context after 3 s without audio). Audio after a barge-in's "
            f"`close_context`, in frame groups of {GROUP_FRAMES} frames, each round: "
            f"{result['barge_in_groups_after_close']} (target <= 2). Targets met: {result['targets']}.",
            "",
        ]
    )


def main(argv=None) -> None:
    args, name, checkpoint = side_bench_options(__doc__, argv, frames=60)
    times = measure_on_server(checkpoint, args.frames, lambda server: measure(server.base_url, args.rounds))
    result = {"checkpoint": name, "rounds": args.rounds, "frames": args.frames, **summarize(times)}
    save_side_bench(result, "ops.bench.agents", f"agents-{name}", args.out, render, argv)


if __name__ == "__main__":
    main()
