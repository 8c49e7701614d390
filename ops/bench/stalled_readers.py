"""`python -m ops.bench.stalled_readers`: what clients that stop reading cost the server.

    python -m ops.bench.stalled_readers                  # tiny checkpoint, a few minutes
    python -m ops.bench.stalled_readers --waves 5 --seconds 120

Two real servers, one after the other: Serve's proxy without our guard (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
emptied) and with it (api/proxy.py, WRITE_TIMEOUT_S=--write-timeout). Each gets the same waves of stalled
readers: a client asks for --seconds of speech as raw PCM at speed 0.25 (four times the bytes per second of
speech), reads the headers, and never reads again, keeping its connection open. A wave starts once the
previous request has ended on the server. Sampled every second: the RSS of Serve's proxy (the one process
that writes to clients) and of all the server's processes, against their values before the first wave.
Results: results/bench/<machine>/stalled-readers-<checkpoint>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Optional

from ops.bench import save_side_bench
from serve_app.api.proxy import PROXY_CALLBACK_VARIABLE
from serve_app.core import processes
from serve_app.core.constants import PROJECT_ROOT
from serve_app.core.settings import Settings
from serve_app.tools.local_server import LocalServer

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank. "
CHARS_PER_S = 20  # MAX_AUDIO_S_PER_CHAR=0.05: the tiny model (never ending by itself) speaks to this cap


def stalled_request(port: int, body: dict, headers: Optional[dict] = None) -> tuple[socket.socket, dict]:
    """POST `body` to /v1/audio/speech over a socket with a small receive window, read the status line and
    headers (a 200, else RuntimeError), then nothing more; the socket and the headers by lower-case name
    (each a list: a header may come more than once)."""
    data = json.dumps(body).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}Content-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    sock.settimeout(300)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # byte by byte: nothing of the body is read
    status, *lines = head.decode("latin-1").split("\r\n")
    if " 200 " not in status:
        sock.close()
        raise RuntimeError(f"the server answered {head!r}")
    found: dict = {}
    for line in filter(None, lines):
        name, _, value = line.partition(":")
        found.setdefault(name.strip().lower(), []).append(value.strip())
    return sock, found


def speech_body(seconds: float) -> dict:
    """A request for about `seconds` of speech, as raw PCM at speed 0.25: four times its bytes per second."""
    text = SENTENCE * max(1, round(seconds * CHARS_PER_S / len(SENTENCE)))
    return {"input": text, "voice": "alloy", "response_format": "pcm", "speed": 0.25}


def request_status(server: LocalServer, request_id: str) -> str | None:
    """The request's status in the ingress's log line, once it has one."""
    found = re.search(rf"request id={re.escape(request_id)} .* status=(\w+)", server.log_text())
    return found.group(1) if found else None


def was_reset(sock: socket.socket, wait_s: float) -> bool:
    """Read what is left until the server ends the connection: True if it reset it; False if it closed it,
    or if nothing more came within `wait_s` (0: only what has arrived by now)."""
    sock.settimeout(wait_s)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        return True
    except (BlockingIOError, TimeoutError):
        pass
    return False


def run_mode(guard: bool, checkpoint: Path, waves: int, seconds: float, write_timeout: float, tail: float) -> dict:
    env = {
        "MODEL_ID": str(checkpoint),
        "HF_HUB_OFFLINE": "1",
        "MAX_AUDIO_BASE_S": "0.5",
        "MAX_AUDIO_S_PER_CHAR": str(1 / CHARS_PER_S),
        "WRITE_TIMEOUT_S": str(write_timeout),
    }
    if not guard:
        env[PROXY_CALLBACK_VARIABLE] = ""  # Serve's proxy as it comes
    server = LocalServer(Path(tempfile.mkdtemp(prefix="stalled-")), env)
    sockets: list[socket.socket] = []
    try:
        server.wait_until(lambda r: r.status_code == 200, 300)
        session = processes.session_processes(server.proc.pid)
        proxy = [p for p in session if "ProxyActor" in " ".join(p.cmdline())]  # within our own server only
        time.sleep(3)
        base_proxy, base_all = processes.rss_bytes(proxy), processes.rss_bytes(session)
        samples, ends = [], []
        started = time.monotonic()

        def sample() -> None:
            samples.append(
                {
                    "t": round(time.monotonic() - started, 1),
                    "proxy_mb": round((processes.rss_bytes(proxy) - base_proxy) / 1e6, 1),
                    "all_mb": round(
                        (processes.rss_bytes(processes.session_processes(server.proc.pid)) - base_all) / 1e6, 1
                    ),
                }
            )

        for _ in range(waves):
            sock, headers = stalled_request(int(server.base_url.rsplit(":", 1)[1]), speech_body(seconds))
            request_id = headers["x-request-id"][0]
            sockets.append(sock)
            while (status := request_status(server, request_id)) is None:
                sample()
                time.sleep(1)
            sample()
            ends.append(
                {
                    "request_id": request_id,
                    "status": status,
                    "t": round(time.monotonic() - started, 1),
                    "proxy_mb": samples[-1]["proxy_mb"],
                }
            )
        deadline = time.monotonic() + tail
        while time.monotonic() < deadline:
            sample()
            time.sleep(1)
        reset = sum(was_reset(sock, 0) for sock in sockets)
        return {
            "guard": guard,
            "proxy_rss_before_mb": round(base_proxy / 1e6, 1),
            "server_rss_before_mb": round(base_all / 1e6, 1),
            "peak_proxy_mb": max(s["proxy_mb"] for s in samples),
            "end_proxy_mb": samples[-1]["proxy_mb"],
            "peak_server_mb": max(s["all_mb"] for s in samples),
            "end_server_mb": samples[-1]["all_mb"],
            "requests": ends,
            "connections_reset": reset,
            "samples": samples,
        }
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


def markdown(result: dict, machine: dict) -> str:
    lines = [
        f"# Clients that stop reading ({machine['name']})",
        "",
        f"Checkpoint `{result['checkpoint']}`; {result['waves']} waves, each one client asking for "
        f"{result['seconds']:g} s of speech as PCM at speed 0.25 (~{result['response_mb']:g} MB) and reading "
        f"nothing after the headers; WRITE_TIMEOUT_S={result['write_timeout_s']:g} with the guard. RSS growth "
        f"over the value before the first wave, MB; the end is {result['tail_s']:g} s after the last request ended.",
        "",
        "| Serve's proxy | proxy peak | proxy at the end | all processes peak | all at the end | requests | resets |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in result["modes"]:
        statuses = ", ".join(e["status"] for e in mode["requests"])
        lines.append(
            f"| {'with the guard' if mode['guard'] else 'as it comes'} | {mode['peak_proxy_mb']} | "
            f"{mode['end_proxy_mb']} | {mode['peak_server_mb']} | {mode['end_server_mb']} | {statuses} | "
            f"{mode['connections_reset']} of {result['waves']} |"
        )
    waves = range(1, result["waves"] + 1)
    lines += [
        "",
        "Serve's proxy, RSS growth (MB) as each request ended on the server:",
        "",
        "| Serve's proxy | " + " | ".join(f"wave {w}" for w in waves) + " |",
        "|---|" + "---|" * len(waves),
    ]
    for mode in result["modes"]:
        name = "with the guard" if mode["guard"] else "as it comes"
        lines.append(f"| {name} | " + " | ".join(str(e["proxy_mb"]) for e in mode["requests"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.stalled_readers")
    parser.add_argument("--checkpoint", default="tiny", help="tiny, full, or a checkpoint folder")
    parser.add_argument("--waves", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=60.0, help="speech per request")
    parser.add_argument("--write-timeout", type=float, default=5.0)
    parser.add_argument("--tail", type=float, default=15.0, help="seconds watched after the last request")
    parser.add_argument("--cache", type=Path, default=Settings().cache_dir)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "bench", help="results folder")
    args = parser.parse_args(argv)
    from serve_app.tools.bench.__main__ import checkpoint_path

    kind, folder = checkpoint_path(args.checkpoint, args.cache)
    modes = [
        run_mode(guard, folder, args.waves, args.seconds, args.write_timeout, args.tail) for guard in (False, True)
    ]
    result = {
        "checkpoint": kind,
        "waves": args.waves,
        "seconds": args.seconds,
        "response_mb": round(args.seconds * 4 * 48_000 / 1e6, 1),
        "write_timeout_s": args.write_timeout,
        "tail_s": args.tail,
        "modes": modes,
    }
    save_side_bench(result, "ops.bench.stalled_readers", f"stalled-readers-{kind}", args.out, markdown, argv)


if __name__ == "__main__":
    main()
