"""The server as a LAN-facing Mac runs it, shared by tests/e2e/test_security.py and test_service.py (conftest's
`lan_service`): started by the control script (`ops/sesame-tts start`, what launchd and systemd run) under a
macOS-like userland, with API_KEY and an HF_TOKEN set and short body and write deadlines; the control script's
last test stops it."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx

from serve_app.tools.local_server import free_port
from tests.support.servers import ROOT, TEST_ENV, children

CTL = ROOT / "ops" / "sesame-tts"
API_KEY, WRONG_KEY = "sk-lan-secret-5f2c", "sk-not-the-key-7f3a"
HF_TOKEN = "hf_fake_token_9d1e"


def ctl(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(CTL), *args], env=env, capture_output=True, text=True, timeout=timeout)


@dataclass
class Controlled:
    """A server started by `ops/sesame-tts start`, and what the tests need of it."""

    env: dict
    work: Path  # the folder of its CACHE_DIR, HOME and .env
    port: int
    ray_dir: Path
    started: subprocess.CompletedProcess
    wall: float  # seconds `start` took, as measured around it
    pid: int  # the supervisor's
    serve_pid: int  # its `serve run`, in a session of its own

    @property
    def cache(self) -> Path:
        return self.work / "cache"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def session_pid(self) -> int:
        """The session that holds Ray's and Serve's processes: the supervisor's `serve run`."""
        return self.serve_pid

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.base_url}/health", timeout=10)

    def log_text(self) -> str:
        """What the supervisor logged: every process of the app, in the rotated CACHE_DIR/server.log."""
        return (self.cache / "server.log").read_text(errors="replace")

    def speak(self, text: str, key: Optional[str] = API_KEY, **body) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(f"{self.api}/audio/speech", json={"input": text, **body}, headers=headers, timeout=120)

    def stop(self) -> None:
        ctl("stop", env=self.env)


def start(work: Path, model_id: Path, macos_path: str) -> Controlled:
    """`ops/sesame-tts start` with a HOME of its own and SESAME_TTS_SERVICE=none (it never sees, starts or stops
    a launchd job or systemd unit the developer installed); fails with the script's output if it did not."""
    ray_dir = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths
    (work / "home").mkdir(parents=True)
    (work / "none.env").write_text("")
    port = free_port()
    env = {
        **os.environ,
        **TEST_ENV,
        "MODEL_ID": str(model_id),
        "CACHE_DIR": str(work / "cache"),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "API_KEY": API_KEY,
        "HF_TOKEN": HF_TOKEN,
        "BODY_TIMEOUT_S": "2",
        "BODY_MIN_RATE": "1024",
        "WRITE_TIMEOUT_S": "2",
        "WYOMING_PORT": str(free_port()),  # with the key set: on 127.0.0.1 only (HOST is loopback here anyway)
        "ENV_FILE": str(work / "none.env"),
        "RAY_ADDRESS": "local",
        "RAY_TMPDIR": str(ray_dir),
        "PATH": macos_path,
        "HOME": str(work / "home"),
        "SESAME_TTS_SERVICE": "none",
    }
    began = time.monotonic()
    started = ctl("start", env=env)
    wall = time.monotonic() - began
    if started.returncode != 0:
        ctl("stop", env=env)
        raise AssertionError(started.stdout + started.stderr)
    pid = int((work / "cache" / "server.pid").read_text())
    (serve_pid,) = children(pid)
    return Controlled(env, work, port, ray_dir, started, wall, pid, serve_pid)
