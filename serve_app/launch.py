"""Start the server: `python -m serve_app.launch` (what the README's start command runs).

Serve takes host and port only from the config file's http_options, so this validates the settings
(environment and .env), writes a copy of serve_config.yaml with HOST and PORT applied into CACHE_DIR, and
runs `serve run` on that copy. `serve run serve_config.yaml` keeps working as is.

In the foreground it simply becomes `serve run`. As a service (`--service`, what ops/sesame-tts, launchd
and systemd use) it supervises `serve run` instead: it refuses to start twice, writes the PID file,
copies the server's output into a rotated log, and on SIGTERM lets in-flight streams finish within the
grace period before everything it started is gone.
"""

from __future__ import annotations

import argparse
import json
import logging.handlers
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import yaml

from dotenv import dotenv_values

from .settings import PROJECT_ROOT, Settings, find_env_file
from .voices import VoiceLibrary


def export_ray_variables() -> None:
    """RAY_* entries of .env (e.g. RAY_GRAFANA_HOST for the dashboard) reach Ray like shell variables do."""
    path = find_env_file(os.environ)
    if path is None:
        return
    for key, value in dotenv_values(path).items():
        if key.startswith("RAY_") and value is not None:
            os.environ.setdefault(key, value)


def render_config(settings: Settings, source: Path) -> Path:
    config = yaml.safe_load(source.read_text())
    config.setdefault("http_options", {}).update(host=settings.host, port=settings.port)
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    target = settings.cache_dir / "serve_config.yaml"
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5
STOP_GRACE_S = 40  # in-flight responses get this long to finish after a stop
STOP_KILL_AFTER_S = 15  # then serve run's own shutdown gets this long before everything is killed
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_pid_file(path: Path) -> None:
    """Write our PID; refuse if a live server owns the file, replace a stale one."""
    if path.is_file():
        try:
            pid = int(path.read_text().strip() or 0)
        except ValueError:
            pid = 0
        if pid and pid != os.getpid() and pid_alive(pid):
            sys.exit(f"sesame-tts: already running (pid {pid}, {path})")
        path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")


def in_flight(settings: Settings) -> Optional[int]:
    """Speech requests the running server is still serving (None when it does not answer)."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    try:
        with urllib.request.urlopen(f"http://{host}:{settings.port}/health", timeout=2) as response:
            return json.load(response).get("in_flight")
    except urllib.error.HTTPError as exc:  # 503 while draining still carries the body
        return json.load(exc).get("in_flight")
    except (OSError, ValueError):
        return None


def drain(settings: Settings, log: logging.Logger, grace: float) -> None:
    """Refuse new speech (the drain flag) and wait until in-flight responses are done, at most `grace` s."""
    settings.drain_flag.touch()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        count = in_flight(settings)
        if not count:
            return
        log.info("sesame-tts: waiting for %d in-flight response(s)", count)
        time.sleep(0.5)
    log.info("sesame-tts: grace period over; stopping with responses in flight")


def supervise(command: list[str], settings: Settings) -> int:
    """Run `command` in its own process group, logging its output to a rotated server.log."""
    pid_file = settings.cache_dir / "server.pid"
    claim_pid_file(pid_file)
    settings.drain_flag.unlink(missing_ok=True)
    log = logging.getLogger("sesame_tts.server_log")
    handler = logging.handlers.RotatingFileHandler(settings.cache_dir / "server.log", maxBytes=LOG_MAX_BYTES,
                                                   backupCount=LOG_BACKUPS, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    # serve run shuts Serve down (serve.shutdown()) only on SIGINT; SIGTERM kills it outright. Neither waits
    # for streams in flight, hence our drain first. A background process inherits SIGINT ignored: reset it.
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stopping = threading.Event()

    def shut_down() -> None:
        drain(settings, log, STOP_GRACE_S)
        child.send_signal(signal.SIGINT)  # serve run's own shutdown (serve.shutdown())
        time.sleep(STOP_KILL_AFTER_S)
        _kill_group(child.pid)

    def stop(signum, frame):
        if stopping.is_set():
            return
        stopping.set()
        log.info("sesame-tts: stopping (signal %d); in-flight responses get up to %d s", signum, STOP_GRACE_S)
        # daemon: must not keep this process alive once serve run has exited
        threading.Thread(target=shut_down, name="shutdown", daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        for raw in iter(child.stdout.readline, b""):
            log.info("%s", _ANSI.sub("", raw.decode(errors="replace").rstrip()))
        code = child.wait()
        _kill_group(child.pid)  # anything the cluster left behind
        log.info("sesame-tts: stopped (exit %s)", code)
        return 0 if stopping.is_set() else code
    finally:
        settings.drain_flag.unlink(missing_ok=True)
        if pid_file.is_file() and pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Start Sesame TTS (serve run with HOST/PORT applied).")
    parser.add_argument("config", nargs="?", type=Path, default=PROJECT_ROOT / "serve_config.yaml")
    parser.add_argument("--service", action="store_true",
                        help="supervise: PID file and rotated log in CACHE_DIR, graceful stop on SIGTERM")
    parser.add_argument("--print-env", action="store_true", help="print HOST, PORT and CACHE_DIR for scripts")
    args = parser.parse_args(argv)
    try:
        settings = Settings.load()
        export_ray_variables()
        if args.print_env:
            print(f"HOST={settings.host}\nPORT={settings.port}\nCACHE_DIR={settings.cache_dir}")
            return
        VoiceLibrary.load(settings.voices_dir).resolve(settings.default_voice)
    except Exception as exc:
        sys.exit(f"sesame-tts: cannot start: {getattr(exc, 'message', exc)}")
    if shutil.which(settings.ffmpeg_path) is None:
        print(f"sesame-tts: warning: {settings.ffmpeg_path} not found; /health will report 503 until it is installed",
              file=sys.stderr)
    config = render_config(settings, args.config)
    serve = shutil.which("serve", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if serve is None:
        sys.exit("sesame-tts: cannot start: the `serve` command (ray[serve]) is not installed")
    print(f"sesame-tts: serving {settings.model_id} on http://{settings.host}:{settings.port}/v1", file=sys.stderr)
    os.chdir(PROJECT_ROOT)
    command = [serve, "run", str(config)]
    if args.service:
        sys.exit(supervise(command, settings))
    os.execv(serve, command)


if __name__ == "__main__":
    main()
