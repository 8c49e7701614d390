"""The real server on a LAN footing (API_KEY set, short body and write deadlines): slow bodies and a reader that stops,
over real sockets; secrets in no file Ray or Serve writes; Ray's ports on loopback. The header-level checks
themselves (Host, Origin, lists, /health, docs, log escaping) are tested in-process in test_screen.py."""

from __future__ import annotations

import ipaddress
import json
import socket
import stat
import threading
import time

import httpx
import psutil
import pytest
from websockets.sync.client import connect

from ops.bench.stalled_readers import request_status, speech_body, stalled_request, was_reset
from serve_app.core import processes
from tests.support import sockets
from tests.support.audio import decode, duration, probe, rms
from tests.support.servers import TEST_ENV
from tests.support.service import API_KEY, HF_TOKEN
from tests.support.waiting import wait_for
from tests.support.wyoming import request_lines

pytestmark = pytest.mark.server


@pytest.fixture
def lan_server(lan_service):
    """The server as a LAN-facing Mac runs it (conftest's `lan_service`: started by the control script, API_KEY
    and a token set, short body and write deadlines), shared with test_service.py, which runs next and stops it."""
    return lan_service


def _slow_request(port: int, headers: str, result: list, index: int, sent: threading.Semaphore) -> None:
    """Declare a 100 kB body, send a byte every second, record what the server answers (or "timeout");
    `sent` is released once the headers are out."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(
            f"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}"
            "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{".encode()
        )
        sent.release()
        sock.settimeout(1.0)
        deadline = time.monotonic() + 45
        answer = b""
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                try:
                    sock.sendall(b"a")
                except OSError:  # the server closed its side
                    break
                continue
            if not chunk:
                break
            answer += chunk
            if b"\r\n\r\n" in answer:
                break
        result[index] = answer.split(b"\r\n", 1)[0].decode(errors="replace") or "timeout"


def test_slow_bodies_cannot_hold_the_server(lan_server):
    """90 connections that declare 100 kB and send a byte a second: without the key each gets 401 on its
    headers; with it, 408 once the body's deadline passes. Meanwhile /health and the lists answer."""
    port = int(lan_server.base_url.rsplit(":", 1)[1])
    for headers, expected, count in (("", "401", 90), (f"Authorization: Bearer {API_KEY}\r\n", "408", 40)):
        results: list = [None] * count
        sent = threading.Semaphore(0)
        threads = [threading.Thread(target=_slow_request, args=(port, headers, results, i, sent)) for i in range(count)]
        for thread in threads:
            thread.start()
        for _ in range(count):  # every one is connected, its headers sent, its body trickling
            assert sent.acquire(timeout=60)
        assert httpx.get(f"{lan_server.base_url}/health", timeout=30).status_code == 200
        assert httpx.get(f"{lan_server.api}/models", timeout=30).status_code == 200
        for thread in threads:
            thread.join(90)
        assert all(r is not None and f" {expected} " in r for r in results), results


def test_secrets_are_in_no_file_that_ray_or_serve_writes(lan_server):
    # Something was logged with the key in play: a refused and an accepted request.
    assert httpx.post(f"{lan_server.api}/audio/speech", json={"input": "hi"}, timeout=30).status_code == 401
    ok = httpx.post(
        f"{lan_server.api}/audio/speech",
        json={"input": "Hi.", "response_format": "pcm"},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert ok.status_code == 200 and ok.content
    cache, ray_dir = lan_server.cache, lan_server.ray_dir
    secrets_file = cache / "secrets.env"
    assert API_KEY in secrets_file.read_text() and stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    scanned = 0
    for root in (ray_dir, cache, lan_server.work):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and path != secrets_file and path.stat().st_size < 50 << 20:
                data = path.read_bytes()
                scanned += 1
                assert API_KEY.encode() not in data and HF_TOKEN.encode() not in data, path
    assert scanned > 20  # Ray's session logs (the runtime-env agent's among them) were there to scan
    assert any(p.name.startswith("runtime_env_agent") for p in ray_dir.rglob("*.log"))


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def test_rays_ports_listen_on_loopback_only(lan_server):
    """Every listening socket of the server's processes is on loopback (HOST=127.0.0.1 here), but the
    Serve replicas' own gRPC servers (Ray's token guards them), which Ray binds to every interface."""
    wide = []
    listening = 0
    for proc in processes.session_processes(lan_server.session_pid):
        try:
            connections = proc.net_connections(kind="inet")
            command = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for conn in connections:
            if conn.status != psutil.CONN_LISTEN:
                continue
            listening += 1
            if not _loopback(conn.laddr.ip):
                wide.append((conn.laddr.ip, conn.laddr.port, command[:80]))
    assert listening > 5
    print("listening beyond loopback:", wide)
    assert all("ServeReplica" in command for _, _, command in wide), wide


def test_a_client_that_stops_reading_is_cut_off_and_its_generation_cancelled(lan_server):
    """~200 s of speech (4,030 characters) as PCM at speed 0.25, four times the bytes per second generated:
    ~38 MB, far more than the kernel's socket buffers hold (4 MiB), and long in the making even on a fast
    machine. The client reads the headers and stops. Serve's proxy (the guard) resets the connection 2 s
    (WRITE_TIMEOUT_S) after the client's last read, and the request is cancelled along the chain while the
    model is still generating it; the server serves the next one."""
    port = int(lan_server.base_url.rsplit(":", 1)[1])
    body = speech_body(200)
    assert len(body["input"]) <= 4096  # MAX_INPUT_LENGTH
    sock, headers = stalled_request(port, body, {"Authorization": f"Bearer {API_KEY}"})
    (request_id,) = headers["x-request-id"]  # the app's own id, once (Serve's proxy adds its own otherwise)
    status = wait_for(
        lambda: request_status(lan_server, request_id), timeout=240, what="the request's end in the server log"
    )
    assert status == "cancelled"
    assert f"request {request_id}: the client took no response bytes for 2 s" in lan_server.log_text()
    reset = was_reset(sock, 30)
    sock.close()
    assert reset  # aborted, never ended as a complete body
    ok = httpx.post(
        f"{lan_server.api}/audio/speech",
        json={"input": "Hi.", "response_format": "wav"},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=120,
    )
    samples = decode(ok.content)
    assert ok.status_code == 200 and probe(ok.content)["stream"]["codec_name"] == "pcm_s16le"
    assert duration(samples) > 0.1 and rms(samples) > 0


def test_a_wyoming_client_that_stops_reading_is_cut_off_and_its_generation_cancelled(lan_server):
    """Wyoming's write deadline is HTTP's: a client with a small receive buffer asks for ~60 s of speech and
    reads nothing. Once the bounded buffers between them are full, the server waits WRITE_TIMEOUT_S (2 s),
    closes the connection and cancels the request while the model is still generating it."""
    before = len(lan_server.log_text())
    port = lan_server.health().json()["wyoming"]["port"]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    text = "A long paragraph that would take many seconds to speak in full. " * 18
    data = json.dumps({"text": text}).encode()
    sock.sendall(json.dumps({"type": "synthesize", "data_length": len(data)}).encode() + b"\n" + data)
    line = wait_for(
        lambda: next((line for line in request_lines(lan_server.log_text()[before:])), None),
        "the request's log line",
        timeout=240,
    )
    assert line["status"] == "cancelled", line
    assert "took no audio for 2 s" in lan_server.log_text()[before:]
    sock.close()
    wait_for(lambda: lan_server.health().json()["model"]["generating"] == 0, "the model's batch is empty")


def test_elevenlabs_sockets_take_the_key_in_the_header_or_the_first_message(lan_server):
    """As ElevenLabs allows: the `xi-api-key` header, or `xi_api_key` / `xi-api-key` in the first message
    (the SDK spells it both ways); without it, or with a wrong one, ElevenLabs' 401 error and a close."""
    for headers, first in (
        ({"xi-api-key": API_KEY}, {}),
        (None, {"xi_api_key": API_KEY}),
        (None, {"xi-api-key": API_KEY}),
    ):
        with sockets.socket(lan_server, "stream-input", headers=headers, output_format="pcm_24000") as ws:
            sockets.send(ws, text=" ", **first)
            sockets.send(ws, text="Hello there.")
            sockets.send(ws, text="")
            received = sockets.messages(ws)
        assert received[-1] == {"isFinal": True} and sockets.audio_by_context(received)[""], (headers, first)
    for first in ({}, {"xi_api_key": "sk-wrong"}):
        with sockets.socket(lan_server, "multi-stream-input") as ws:
            sockets.send(ws, text=" ", context_id="c", **first)
            (error,) = sockets.messages(ws)
            assert ws.close_code == 1008
        assert (error["code"], error["error"]) == (401, "invalid_api_key")
    assert API_KEY not in lan_server.log_text()


def test_a_websocket_client_that_stops_reading_is_cut_off_and_its_generation_cancelled(lan_server):
    """The proxy's write deadline holds for WebSockets too: a client with a small receive buffer that reads
    nothing (its library's queue full) is cut off after WRITE_TIMEOUT_S, and the context's generation is
    cancelled while the model is still at it."""
    before = len(lan_server.log_text())  # (the key test's lines may come later: Ray forwards them with a lag)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", lan_server.port))
    url = f"ws://127.0.0.1:{lan_server.port}/elevenlabs/v1/text-to-speech/conversational/stream-input"
    with connect(
        url + "?output_format=pcm_48000", sock=raw, max_queue=1, additional_headers={"xi-api-key": API_KEY}
    ) as ws:
        sockets.send(ws, text=" ", voice_settings={"speed": 0.25})  # four times the bytes per generated second
        sockets.send(ws, text="A long paragraph that would take many seconds to speak in full. " * 18)
        sockets.send(ws, text="")
        line = wait_for(
            lambda: next(
                (x for x in request_lines(lan_server.log_text(), "websocket") if x["format"] == "pcm_48000"), 0
            ),
            "the context's log line",
            timeout=240,
        )
    # The context's log line counts the sentences generated whole before the cut (at speed 0.25: 4 s of audio
    # per generated second); the cut came before half of the text's (`chars` at MAX_AUDIO_S_PER_CHAR).
    whole_s = float(line["chars"]) * float(TEST_ENV["MAX_AUDIO_S_PER_CHAR"]) / 0.25
    assert line["status"] == "cancelled" and float(line["audio_s"]) < whole_s / 2, line
    assert "took no response bytes for 2 s" in lan_server.log_text()[before:]
    wait_for(lambda: lan_server.health().json()["model"]["generating"] == 0, "the model's batch is empty")
