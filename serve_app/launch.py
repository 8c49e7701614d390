"""Start the server: `python -m serve_app.launch` (what the README's start command runs).

Serve takes host and port only from the config file's http_options, so this validates the settings
(environment and .env), writes a copy of serve_config.yaml with HOST and PORT applied into CACHE_DIR, and
replaces itself with `serve run` on that copy. `serve run serve_config.yaml` keeps working as is.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import yaml

from .settings import PROJECT_ROOT, ConfigError, Settings
from .voices import VoiceLibrary


def render_config(settings: Settings, source: Path) -> Path:
    config = yaml.safe_load(source.read_text())
    config.setdefault("http_options", {}).update(host=settings.host, port=settings.port)
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    target = settings.cache_dir / "serve_config.yaml"
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    source = Path(argv[0]) if argv else PROJECT_ROOT / "serve_config.yaml"
    try:
        settings = Settings.load()
        VoiceLibrary.load(settings.voices_dir).resolve(settings.default_voice)
    except Exception as exc:
        sys.exit(f"sesame-tts: cannot start: {getattr(exc, 'message', exc)}")
    if shutil.which(settings.ffmpeg_path) is None:
        print(f"sesame-tts: warning: {settings.ffmpeg_path} not found; /health will report 503 until it is installed",
              file=sys.stderr)
    config = render_config(settings, source)
    serve = shutil.which("serve", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if serve is None:
        sys.exit("sesame-tts: cannot start: the `serve` command (ray[serve]) is not installed")
    print(f"sesame-tts: serving {settings.model_id} on http://{settings.host}:{settings.port}/v1", file=sys.stderr)
    os.chdir(PROJECT_ROOT)
    os.execv(serve, [serve, "run", str(config)])


if __name__ == "__main__":
    main()
