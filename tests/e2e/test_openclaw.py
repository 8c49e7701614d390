"""OpenClaw's own CLI (pinned) turns text into voice files through this server."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.support.audio import decode, probe, rms

pytestmark = [pytest.mark.server, pytest.mark.network]  # npm installs OpenClaw on a first run


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
    result = subprocess.run(
        [str(cli), "infer", "tts", "convert", "--text", "Hello Burke, this is Max.", "--output", str(out), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["provider"] == "openai" and report["attempts"][-1]["outcome"] == "success"
    assert report["outputs"][0]["format"] == fmt
    data = out.read_bytes()
    info = probe(data)
    assert info["format"]["format_name"] == format_name and info["stream"]["codec_name"] == codec
    assert rms(decode(data)) > 0.01
