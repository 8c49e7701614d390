"""Starting and probing real servers for the tests: the README's own launcher (or the design card's bare
`serve run`) on a free loopback port, the load test against it, and the processes a server started (psutil, by
session)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from serve_app.api.proxy import PROXY_CALLBACK_VARIABLE
from serve_app.core import processes
from serve_app.core.constants import PROJECT_ROOT as ROOT
from serve_app.launch import prepare_ray_environment
from serve_app.tools.local_server import LocalServer, ServerFailed
from tests.support.waiting import wait_for

# Small runaway caps: the tiny model never emits end-of-speech, so every request runs to its cap.
TEST_ENV = {
    "MAX_AUDIO_BASE_S": "0.5",
    "MAX_AUDIO_S_PER_CHAR": "0.05",
    "LOG_LEVEL": "info",
    "HF_HUB_OFFLINE": "1",
}


ENGINE_CAPS = dict(max_audio_base_s=0.5, max_audio_s_per_char=0.05)

# The suite's tiny checkpoint samples Mimi's first 8 codebooks (as Moshi does) instead of CSM's 32: a frame is
# then one backbone step and 7 depth-decoder steps instead of 31, ~2.6x less CPU per frame here, and every
# e2e request runs to its cap. The serving code reads the count from the checkpoint; what depends on CSM's
# own 32 (the layout as the tool writes it by default) is tested on `csm_tiny_checkpoint`.
TINY_CODEBOOKS = 8


class Server(LocalServer):
    """A local server for the tests; one that dies or never gets ready fails the test with its log's tail.

    `service=True` starts it as launchd and systemd do (`python -m serve_app.launch --service`): the
    supervisor, whose `serve run` runs in a session of its own and writes to the rotated CACHE_DIR/server.log."""

    def __init__(self, work: Path, env: dict, command=None, service: bool = False):
        if service:
            command = lambda port: [sys.executable, "-m", "serve_app.launch", "--service"]  # noqa: E731
        super().__init__(work, env, command)
        self.service = service

    def log_text(self) -> str:
        """What the server printed (and, as a service, what its supervisor logged)."""
        logs = [self.log, self.work / "cache" / "server.log"] if self.service else [self.log]
        return "".join(log.read_text(errors="replace") for log in logs if log.exists())

    @property
    def session_pid(self) -> int:
        """The session that holds Ray's and Serve's processes: the server's own, or its supervisor's child's."""
        return processes.children(self.proc.pid)[0] if self.service else self.proc.pid

    def wait_until(self, ready: Callable[[httpx.Response], bool], timeout: float = 180) -> httpx.Response:
        try:
            return super().wait_until(ready, timeout)
        except ServerFailed as exc:
            pytest.fail(str(exc))


def launch_server(work: Path, model_id: Path, service: bool = False, **env_overrides: str) -> Server:
    """Start `python -m serve_app.launch` (as the README does; `service`: as the boot service does) on a
    free loopback port; returns at once."""
    return Server(work, {**TEST_ENV, "MODEL_ID": str(model_id), **env_overrides}, service=service)


def bare_serve_run(work: Path, model_id: Path, **env_overrides: str) -> Server:
    """The design card's own ops command, a bare `serve run serve_config.yaml` as shipped (no launcher, so no
    proxy callback of ours: Serve's proxy exactly as it comes) on a free loopback port, its settings from the
    environment as Serve hands it to the replicas; returns at once."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    serve = shutil.which("serve", path=os.path.dirname(sys.executable))
    assert serve, "ray[serve]'s `serve` command is installed beside this Python"

    def command(port: int) -> list[str]:  # the file as shipped, on a free loopback port
        config["http_options"].update(host="127.0.0.1", port=port)
        path = work / "serve_config.yaml"
        path.write_text(yaml.safe_dump(config))
        return [serve, "run", str(path)]

    env = {**TEST_ENV, "MODEL_ID": str(model_id), "RAY_ADDRESS": "local", **env_overrides}
    prepare_ray_environment(env)  # Ray private and on loopback, as on a user's machine
    env[PROXY_CALLBACK_VARIABLE] = ""  # Serve's proxy exactly as it comes: none of our middleware
    return Server(work, env, command=command)


def logged(server, request_id: str) -> str:
    """The request's line in a server's log (`server.log_text()`), waited for: Ray forwards replica output as it
    comes."""

    def line() -> str:
        return next((entry for entry in server.log_text().splitlines() if f"request id={request_id} " in entry), "")

    return wait_for(line, f"the log line of request {request_id}", timeout=120, every=0.2)


def healthy(response: httpx.Response) -> bool:
    return response.status_code == 200


def run_loadtest(base_url: str, clients: int, requests: int, tmp_path: Path) -> dict:
    """`python -m serve_app.tools.loadtest` against a server (bounded); its JSON report, once it exited cleanly."""

    report_file = tmp_path / "load.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "serve_app.tools.loadtest",
            "--url",
            base_url,
            "--clients",
            str(clients),
            "--requests",
            str(requests),
            "--max-seconds",
            "120",
            "--json",
            str(report_file),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(report_file.read_text())
    assert report["error"] == report["truncated"] == report["invalid"] == 0, report["failures"]
    return report


def session_processes(sid: int) -> list[str]:
    """Lines "sid pid args" of every live process in session `sid` (a server started with start_new_session:
    its pid), through psutil (Linux and macOS alike)."""
    lines = []
    for proc in processes.session_processes(sid):
        try:
            lines.append(f"{sid} {proc.pid} {' '.join(proc.cmdline()) or proc.name()}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # it ended meanwhile
            pass
    return lines


def settled(model, timeout: float = 120) -> dict:
    """The in-process model deployment's /health body once it has stopped loading (ready or failed)."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while (health := asyncio.run(model.health())).status == "loading":
        assert time.monotonic() < deadline, "the model is still loading"
        time.sleep(0.05)
    return health.body()


children = processes.children  # the direct children of a process we started


def one_request_id_names_the_next(client) -> tuple[str, str]:
    """Through a real server, with the openai SDK: a response carries exactly one `x-request-id`, its audio
    decodes, and the header's value as the SDK hands it over names that response in the next request's
    `previous_request_ids`. The two ids."""
    from tests.support.audio import decode, duration, rms

    ids = []
    for text, context in (("Did you get my message?", None), ("Yes, I did.", ids)):
        response = client.audio.speech.with_raw_response.create(
            model="csm-1b",
            voice="conversational",
            input=text,
            response_format="wav",
            extra_body={"previous_request_ids": list(context)} if context else None,
        )
        (request_id,) = response.headers.get_list("x-request-id")
        samples = decode(response.content)
        assert duration(samples) > 0.1 and rms(samples) > 0.01
        ids.append(request_id)
    assert ids[0] != ids[1]
    return ids[0], ids[1]
