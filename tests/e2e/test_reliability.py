"""Overload, hostile input, soak and a killed model replica, on a server of their own with a small queue: the
design card's own ops command, a bare `serve run serve_config.yaml` (no launcher, so no proxy callback of
ours), its settings from the environment.

The server admits MAX_BATCH_SIZE=2 generating (batched) + MAX_QUEUED_REQUESTS=1 waiting requests; beyond
that it must answer 429 with Retry-After and OpenAI's body, before any audio. As shipped, with Serve's proxy
as it comes, every response carries exactly one `x-request-id` (Serve's own, which the app adopts), a client
that passes that header's value back as it received it gets context from it, and Home Assistant's Wyoming
port starts with the app and is gone when it stops (the last test).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openai import OpenAI
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from wyoming.tts import Synthesize

from serve_app.audio.pool import MAX_COMMANDS
from serve_app.tools.local_server import free_port
from tests.support import sockets
from tests.support.audio import decode, duration, rms
from tests.support.servers import (
    ROOT,
    bare_serve_run,
    healthy,
    logged,
    one_request_id_names_the_next,
    run_loadtest,
    session_processes,
)
from tests.support.waiting import wait_for
from tests.support.wyoming import client as wyoming_client
from tests.support.wyoming import closed, read_until

pytestmark = pytest.mark.server

CAPACITY = 3  # MAX_BATCH_SIZE + MAX_QUEUED_REQUESTS
# Six sentences, ~2 s of audio each at this server's caps (~150 frames): a few seconds of generation here, so the
# holders keep their places while a test's requests are refused (the two generating end first, then the third).
HOLD_TEXT = "This sentence keeps the model busy for a little while, long enough to fill the queue. " * 6


@pytest.fixture(scope="module")
def busy(tiny_checkpoint, tmp_path_factory):
    server = bare_serve_run(
        tmp_path_factory.mktemp("busy"),
        tiny_checkpoint,
        MAX_BATCH_SIZE="2",
        MAX_QUEUED_REQUESTS="1",
        MAX_AUDIO_BASE_S="0.24",
        MAX_AUDIO_S_PER_CHAR="0.02",
        WYOMING_PORT=str(free_port()),
    )
    try:
        server.wait_until(healthy)
        yield server
    finally:
        server.stop()


async def wyoming_one_shot(server, text: str):
    """A Wyoming `synthesize`: the events up to its audio-stop or error, and whether the server then closed."""
    async with wyoming_client(server) as wyoming:
        await wyoming.write_event(Synthesize(text=text).event())
        events = await read_until(wyoming, "audio-stop", "error")
        return events, events[-1].type == "error" and await closed(wyoming)


def in_flight(server) -> int:
    return server.health().json()["in_flight"]


class Holders:
    """`n` long requests in threads, holding the server's places until they finish."""

    def __init__(self, server, n: int):
        self.responses: list[httpx.Response] = []
        self.threads = [threading.Thread(target=self._post, args=(server,)) for _ in range(n)]
        for thread in self.threads:
            thread.start()
        deadline = time.monotonic() + 20
        while in_flight(server) < n:
            assert time.monotonic() < deadline, "the holding requests never got in"
            time.sleep(0.01)

    def _post(self, server) -> None:
        self.responses.append(
            httpx.post(f"{server.api}/audio/speech", timeout=120, json={"input": HOLD_TEXT, "response_format": "wav"})
        )

    def join(self) -> list[httpx.Response]:
        for thread in self.threads:
            thread.join(timeout=120)
        return self.responses


def test_over_capacity_gets_429_with_retry_after_before_any_audio(busy):
    holders = Holders(busy, CAPACITY)
    response = httpx.post(f"{busy.api}/audio/speech", json={"input": "One more."}, timeout=30)
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/json"
    assert 1 <= int(response.headers["retry-after"]) <= 30
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    # Wyoming goes through the same admission: busy is an error event that says to retry, and no audio.
    events, was_closed = asyncio.run(wyoming_one_shot(busy, "One more."))
    assert [e.type for e in events] == ["error"] and was_closed
    assert "retry in" in events[0].data["text"] and events[0].data["code"] == "rate_limit_exceeded"
    # So do ElevenLabs' sockets: ElevenLabs' error shape, naming the context, then a close (try again later).
    with sockets.socket(busy, "multi-stream-input", auto_mode="true") as ws:
        sockets.send(ws, text="One more. ", context_id="c")
        received = sockets.messages(ws)
        assert ws.close_code == 1013
    assert [(m["code"], m["error"], m["contextId"]) for m in received] == [(429, "rate_limit_exceeded", "c")]
    # The admitted requests are unharmed: each is whole, audible audio.
    for held in holders.join():
        assert held.status_code == 200
        samples = decode(held.content)
        assert duration(samples) > 3.0 and rms(samples) > 0.01
    assert in_flight(busy) == 0
    assert "status=429" in busy.log_text()


def test_openai_sdk_retries_a_429_after_retry_after_and_succeeds(busy):
    events: list[tuple[str, float, int | None]] = []
    http = httpx.Client(
        event_hooks={
            "request": [lambda request: events.append(("request", time.monotonic(), None))],
            "response": [lambda response: events.append(("response", time.monotonic(), response.status_code))],
        }
    )
    client = OpenAI(base_url=busy.api, api_key="unused", max_retries=8, http_client=http, timeout=60)
    holders = Holders(busy, CAPACITY)
    audio = client.audio.speech.create(model="csm-1b", voice="alloy", input="Worth the wait.", response_format="wav")
    holders.join()
    statuses = [status for kind, _, status in events if kind == "response"]
    assert statuses[0] == 429 and statuses[-1] == 200, statuses
    # The SDK waited at least the Retry-After the server sent (1 s or more) before trying again.
    first_429 = next(t for kind, t, status in events if status == 429)
    retry = next(t for kind, t, _ in events if kind == "request" and t > first_429)
    assert retry - first_429 >= 0.9
    assert rms(decode(audio.content)) > 0.01


def test_loadtest_at_eight_times_capacity_gives_only_audio_or_429(busy, tmp_path):
    report = run_loadtest(busy.base_url, 8 * CAPACITY, 24, tmp_path)
    assert report["ok"] >= 1 and report["attempts_429"] >= 8, report  # it served, and it really was overloaded
    assert report["ok"] + report["rate_limited"] + report["hung_up"] == report["requests"] == 24
    assert report["ttfb_ms"]["p50"] is not None
    health = busy.wait_until(lambda r: r.json()["in_flight"] == 0, timeout=30).json()
    assert health["status"] == "ok" and health["encoders_running"] == 0


def test_loadtest_refuses_a_non_loopback_target():
    run = subprocess.run(
        [sys.executable, "-m", "serve_app.tools.loadtest", "--url", "http://192.0.2.1:8880"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0 and "only loopback" in run.stderr


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_body_gets_413(busy, chunked):
    body = json.dumps({"input": "x" * 300_000}).encode()
    content = (body[i : i + 65536] for i in range(0, len(body), 65536)) if chunked else body
    response = httpx.post(
        f"{busy.api}/audio/speech", content=content, timeout=30, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")
    assert busy.health().status_code == 200


HOSTILE_VOICES = [
    "../../etc/passwd",
    "/etc/passwd",
    "voices/fast.yaml",
    "fast/../fast",
    "fast.yaml",
    "$(touch x)",
    "`id`",
    "fast; rm -rf /",
    "..",
    "%2e%2e%2ffast",
    "C:\\Windows\\win.ini",
    "fast\x00",
]


@pytest.mark.parametrize("voice", HOSTILE_VOICES)
def test_voice_names_with_path_or_shell_characters_are_unknown_voices(busy, voice):
    response = httpx.post(f"{busy.api}/audio/speech", json={"input": "hi", "voice": voice}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_voice"


ODD_INPUTS = [
    "😀😀😀",
    "東京、大阪。",
    "مرحبا بالعالم",
    "e\u0301\u0308",
    "**bold** [a](https://x.io)",
    "\x00\x01 hi \x7f",
    "1,000,000 at 3.14%",
    "x" * 300,
    "\u202eevil\u202c",
    "‮",
    "\ud800",
    "ok \udc00 ok",
    "\u200b\u200b",
    "\ue000",
    "\ufeff",
]
UNSPEAKABLE = {"‮", "\ud800", "ok \udc00 ok", "\u200b\u200b", "\ue000", "\ufeff"}


@pytest.mark.parametrize("text", ODD_INPUTS, ids=range(len(ODD_INPUTS)))
def test_odd_input_is_spoken_or_refused_cleanly(busy, text):
    # Escaped as JSON clients send it, so a lone surrogate travels too ("\\ud800").
    response = httpx.post(
        f"{busy.api}/audio/speech",
        content=json.dumps({"input": text, "response_format": "wav"}),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    if text in UNSPEAKABLE:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "input", "invalid_input")
    elif response.status_code == 200:
        assert duration(decode(response.content)) > 0.05
    else:
        assert response.status_code == 400 and response.json()["error"]["code"] == "empty_input"


def test_soak_memory_stays_flat_and_no_child_process_is_left(busy, tmp_path):
    count = int(os.environ.get("SOAK_REQUESTS", "40"))  # the recorded long run: 300
    report_file = tmp_path / "soak.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "serve_app.tools.loadtest",
            "--url",
            busy.base_url,
            "--soak",
            str(count),
            "--json",
            str(report_file),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads(report_file.read_text())
    assert run.returncode == 0 and not report["failed"], report["failed"]
    assert report["rss_growth_pct"] < 5.0, report
    assert all(sample["ffmpeg_running"] == 0 for sample in report["curve"])
    # What is left is the idle ffmpeg the encoder keeps started for the next response (FFMPEG_WARM, one per
    # format used), no more. (A replacement started by the last response may take a moment to be listed.)
    deadline = time.monotonic() + 10
    while True:
        warm = httpx.get(f"{busy.base_url}/health", timeout=30).json()["encoders_warm"]
        ffmpeg = sorted(int(line.split()[1]) for line in session_processes(busy.proc.pid) if "ffmpeg" in line)
        if ffmpeg == warm["pids"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ffmpeg == warm["pids"] and 0 < len(ffmpeg) <= MAX_COMMANDS, (ffmpeg, warm)


FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))  # per generation mode (valid, invalid)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_schema_fuzzing_gets_only_documented_statuses_with_openai_bodies(busy, mode):
    """Requests generated from the server's own OpenAPI document, across all its operations."""
    schema = schemathesis.openapi.from_url(f"{busy.base_url}/openapi.json")
    seen: list[int] = []

    @given(case=schema.as_strategy(generation_mode=mode))
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        response = case.call(timeout=120)
        seen.append(response.status_code)
        case.validate_response(
            response,
            checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
        )
        if response.status_code >= 400 and case.path != "/health":
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()
    print(f"\nfuzzing ({mode.value}): {len(seen)} requests, statuses {dict(sorted(Counter(seen).items()))}")
    assert len(seen) >= FUZZ_EXAMPLES // 2


def test_server_is_healthy_after_fuzzing(busy):
    assert busy.health().status_code == 200
    # Bad input is answered, not logged as a failure: no traceback from the ingress or the text frontend.
    noisy = [
        line
        for line in busy.log_text().splitlines()
        if ("SpeechIngress" in line or "TextFrontend" in line) and "Traceback" in line
    ]
    assert noisy == []


def test_killed_model_replica_comes_back_and_in_flight_clients_see_an_error(busy):
    """It kills the model replica outright (the tests after it start once it is back)."""
    pid = busy.health().json()["model"]["memory"]["pid"]
    outcome: dict = {}

    def stream() -> None:
        try:
            with httpx.stream(
                "POST", f"{busy.api}/audio/speech", timeout=60, json={"input": HOLD_TEXT, "response_format": "mp3"}
            ) as response:
                outcome["status"] = response.status_code
                for _ in response.iter_raw():
                    outcome.setdefault("first", time.monotonic())
            outcome["end"] = "complete"
        except httpx.HTTPError as exc:
            outcome["end"] = type(exc).__name__
        outcome["ended"] = time.monotonic()

    client = threading.Thread(target=stream)
    client.start()
    deadline = time.monotonic() + 20
    while "first" not in outcome:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    client.join(timeout=60)
    assert not client.is_alive(), "the in-flight client hung after the replica died"
    assert outcome["status"] == 200 and outcome["end"] != "complete", outcome
    # A request during the outage is answered (503 with Retry-After until the model is back), never hangs.
    during = httpx.post(
        f"{busy.api}/audio/speech", json={"input": "Anyone there?", "response_format": "pcm"}, timeout=60
    )
    answered = time.monotonic() - killed
    assert during.status_code in (200, 503), during.text
    if during.status_code == 503:
        assert during.headers["retry-after"].isdigit()
        assert during.json()["error"]["code"] in ("model_restarting", "model_not_ready")
    busy.wait_until(healthy, timeout=120)
    back = busy.health().json()
    assert back["model"]["memory"]["pid"] != pid
    response = httpx.post(
        f"{busy.api}/audio/speech", json={"input": "Back again.", "response_format": "wav"}, timeout=60
    )
    assert response.status_code == 200 and rms(decode(response.content)) > 0.01
    print(
        f"\nreplica killed: client saw {outcome['end']} after {outcome['ended'] - killed:.2f} s; a request "
        f"during the outage got {during.status_code} ({during.text[:80]!r}) at {answered:.2f} s; "
        f"healthy and serving again after {time.monotonic() - killed:.1f} s"
    )


def request_ids(response: httpx.Response) -> list[str]:
    return [value for name, value in response.headers.multi_items() if name.lower() == "x-request-id"]


def test_one_request_id_that_the_next_request_can_name(busy):
    busy.wait_until(healthy)
    earlier = len(busy.log_text())  # (the replica killed before may have logged its death)
    client = OpenAI(base_url=busy.api, api_key="unused", max_retries=0, timeout=120)
    first, second = one_request_id_names_the_next(client)
    logged(busy, first)  # the log line names the same id
    logged(busy, second)

    refused = httpx.post(f"{busy.api}/audio/speech", json={"input": "x", "voice": "nobody"}, timeout=30)
    assert refused.status_code == 400 and len(request_ids(refused)) == 1
    logged(busy, request_ids(refused)[0])
    assert "Traceback" not in busy.log_text()[earlier:]
    assert "user-provided callback" not in busy.log_text()  # it really was Serve's proxy as it comes


def test_the_wyoming_port_lives_as_long_as_the_app(busy):
    """Runs last here: it stops the server."""
    port = busy.health().json()["wyoming"]["port"]

    async def speak():
        async with wyoming_client(busy) as wyoming:
            await wyoming.write_event(Synthesize(text="Hello there.").event())
            return await read_until(wyoming, "audio-stop")

    events = asyncio.run(speak())
    assert events[0].type == "audio-start" and any(e.type == "audio-chunk" for e in events)
    busy.stop()

    def closed() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except OSError:
            return True
        return False

    wait_for(closed, "the Wyoming port closed with the app")
