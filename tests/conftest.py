"""Shared fixtures: a tiny random-weight checkpoint, and the real server started once per session.

The server is started exactly as the README does (`python -m serve_app.launch`, i.e. `serve run` on
serve_config.yaml) with MODEL_ID pointing at the tiny checkpoint, on a free loopback port. Nothing here
reaches the network.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent

# Small runaway caps: the tiny model never emits end-of-speech, so every request runs to its cap.
TEST_ENV = {
    "MAX_AUDIO_BASE_S": "0.5",
    "MAX_AUDIO_S_PER_CHAR": "0.05",
    "LOG_LEVEL": "info",
    "HF_HUB_OFFLINE": "1",
}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from serve_app.tiny_checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny-csm"))


# The engine's caps, the same as the server's in TEST_ENV.
ENGINE_CAPS = dict(max_audio_base_s=0.5, max_audio_s_per_char=0.05)


@pytest.fixture(scope="session")
def voices():
    from serve_app.settings import Settings
    from serve_app.voices import VoiceLibrary

    return VoiceLibrary.load(Settings().voices_dir)


@pytest.fixture(scope="session")
def engine(tiny_checkpoint, voices):
    """The real CSM engine on the tiny checkpoint, in-process (no Ray)."""
    from serve_app.engine.generation import CSMEngine
    from serve_app.settings import Settings

    return CSMEngine.load(Settings(model_id=str(tiny_checkpoint), **ENGINE_CAPS), voices)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base_url: str, proc: subprocess.Popen, log: Path):
        self.base_url = base_url
        self.api = f"{base_url}/v1"
        self.proc = proc
        self.log = log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.base_url}/health", timeout=10)

    def wait_until(self, ready: Callable[[httpx.Response], bool], timeout: float = 180) -> httpx.Response:
        """Poll /health until `ready(response)`; fail with the log's tail if the server exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                response = self.health()
                if ready(response):
                    return response
            except (httpx.HTTPError, ValueError, KeyError):  # not up yet: Serve's proxy answers in plain text
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {timeout} s:\n{self.log_text()[-3000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        _stop(self.proc)


def launch_server(work: Path, model_id: Path, **env_overrides: str) -> Server:
    """Start `python -m serve_app.launch` (as the README does) on a free loopback port; returns at once."""
    work.mkdir(parents=True, exist_ok=True)
    env_file = work / "empty.env"
    env_file.write_text("")
    port = _free_port()
    env = {**os.environ, **TEST_ENV, "MODEL_ID": str(model_id), "CACHE_DIR": str(work / "cache"),
           "HOST": "127.0.0.1", "PORT": str(port), "ENV_FILE": str(env_file), "RAY_ADDRESS": "local", **env_overrides}
    log = work / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "serve_app.launch"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Server(f"http://127.0.0.1:{port}", proc, log)


def healthy(response: httpx.Response) -> bool:
    return response.status_code == 200


@pytest.fixture(scope="session")
def server(tiny_checkpoint, tmp_path_factory) -> Server:
    server = launch_server(tmp_path_factory.mktemp("server"), tiny_checkpoint)
    try:
        server.wait_until(healthy)
        yield server
    finally:
        server.stop()


def session_processes(sid: int) -> list[str]:
    """`ps` lines of every process in session `sid` (a server started with start_new_session: its pid)."""
    out = subprocess.run(["ps", "-eo", "sid=,pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split()[0] == str(sid)]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.api, api_key="sk-test-unused", max_retries=0, timeout=60)
