"""The real server, started locally the way the README starts it: for the test suite and the benchmark.

`python -m serve_app.launch` on a free loopback port, in a session of its own (so `stop` ends Ray and every
replica with it), with an empty env file (a developer's `.env` cannot leak in) and its output in a log file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Optional

import httpx

from serve_app.core.constants import PROJECT_ROOT


class ServerFailed(RuntimeError):
    """The server exited, or was not ready in time; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """One server process group; `env` is laid over this process's environment and the local defaults.
    `command(port)`, if given, is what runs instead of the launcher (a bare `serve run`, say)."""

    def __init__(self, work: Path, env: Mapping[str, str], command: Optional[Callable[[int], list[str]]] = None):
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        env_file = work / "empty.env"
        env_file.write_text("")
        port = free_port()
        full_env = {
            **os.environ,
            "CACHE_DIR": str(work / "cache"),
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "ENV_FILE": str(env_file),
            "RAY_ADDRESS": "local",
            **env,
        }
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.api = f"{self.base_url}/v1"
        self.log = work / "server.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                command(port) if command else [sys.executable, "-m", "serve_app.launch"],
                cwd=PROJECT_ROOT,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.base_url}/health", timeout=10)

    def wait_until(self, ready: Callable[[httpx.Response], bool], timeout: float = 180) -> httpx.Response:
        """Poll /health until `ready(response)`; `ServerFailed` if the server exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerFailed(f"server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                response = self.health()
                if ready(response):
                    return response
            except (httpx.HTTPError, ValueError, KeyError):  # not up yet: Serve's proxy answers in plain text
                pass
            if time.monotonic() > deadline:
                raise ServerFailed(f"server not ready after {timeout} s:\n{self.log_text()[-3000:]}")
            time.sleep(0.3)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the whole session (the supported graceful stop), SIGKILL if it is still there."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
