"""Start the server: `python -m serve_app.launch` (what the README's start command runs).

Serve takes host and port only from the config file's http_options, so this validates the settings
(environment and .env), writes a copy of serve_config.yaml with HOST and PORT applied into CACHE_DIR, and
runs `serve run` on that copy. `serve run serve_config.yaml` keeps working as is.

In the foreground it simply becomes `serve run`. As a service (`--service`, what ops/sesame-tts, launchd
and systemd use) it hands `serve run` to the supervisor (supervisor.py). The control commands the script
uses (`--pid`, `--stop`, `--print-env`, `--render`, ...) are here too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml
from dotenv import dotenv_values

from serve_app import service
from serve_app.api.proxy import PROXY_CALLBACK, PROXY_CALLBACK_VARIABLE
from serve_app.core.constants import IDLE_RAY_SERVE, PROJECT_ROOT
from serve_app.core.settings import SECRET_SETTINGS, Settings, find_env_file
from serve_app.service import running_pid
from serve_app.supervisor import base_url, supervise
from serve_app.voices.presets import VoiceLibrary


def export_ray_variables() -> None:
    """RAY_* entries of .env (e.g. RAY_GRAFANA_HOST for the dashboard) reach Ray like shell variables do."""
    path = find_env_file(os.environ)
    if path is None:
        return
    for key, value in dotenv_values(path).items():
        if key.startswith("RAY_") and value is not None:
            os.environ.setdefault(key, value)


def render_config(settings: Settings, source: Path) -> Path:
    """The config `serve run` gets: HOST and PORT applied, and every setting given in the environment or
    .env written into the app's `args`. On a Ray cluster of several machines (RAY_ADDRESS) Serve builds
    the app in a worker process of the cluster, which does not see this shell's environment; the builder
    reads `args` first (app.build_app).

    The secrets (API_KEY, HF_TOKEN) go into neither: Serve logs `args`, and Ray's runtime-env agent writes
    a runtime_env's variables in plain text to a world-readable log. They go into CACHE_DIR/secrets.env
    (0600), whose path the app's args carry; each replica reads it there (Settings.with_secrets)."""
    config = yaml.safe_load(source.read_text())
    config.setdefault("http_options", {}).update(host=settings.host, port=settings.port)
    given = Settings.given()
    secrets = {k: given.pop(k) for k in SECRET_SETTINGS if k in given}
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    secrets_file = settings.cache_dir / "secrets.env"
    if secrets:
        _write_private(secrets_file, "".join(f"{k}={json.dumps(v, ensure_ascii=False)}\n" for k, v in secrets.items()))
        given["SECRETS_FILE"] = str(secrets_file)
    else:  # a key removed since the last start must not live on
        secrets_file.unlink(missing_ok=True)
    for app in config.get("applications", []):
        app["args"] = {**given, **(app.get("args") or {})}
    target = settings.cache_dir / "serve_config.yaml"
    _write_private(target, yaml.safe_dump(config, sort_keys=False))
    return target


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by this user only from its first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def private_ray_dir(environ=os.environ) -> None:
    """Ray's temp folder (sockets, session logs, the runtime-env agent's log) private to this user: Ray's
    default /tmp/ray is shared by every user of the machine. Kept short: Ray's socket paths must fit in 107
    characters. An existing folder that another user owns, or that others may enter, is refused."""
    if environ.get("RAY_TMPDIR"):
        return
    folder = Path(f"/tmp/sesame-tts-{os.getuid()}")
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.lstat()
    if folder.is_symlink() or info.st_uid != os.getuid():
        raise SystemExit(f"sesame-tts: cannot start: {folder} is not this user's own folder; remove it")
    if info.st_mode & 0o077:
        folder.chmod(0o700)
    environ["RAY_TMPDIR"] = str(folder)


def prepare_ray_environment(environ=os.environ) -> None:
    """What Ray needs, set before `serve run` starts it.

    Alone (no RAY_ADDRESS, or "local"): Ray on loopback, in a temp folder private to this user. With
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (macOS's default, set here on Linux too) a local cluster keeps the
    node address 127.0.0.1, so its GCS, raylet, agents, dashboard and metrics listen on loopback only (Ray
    rewrites a given 127.0.0.1 to the machine's address otherwise); what stays on every interface is each
    Serve replica's own gRPC server (token-protected) and, by HOST, the HTTP port.

    In a cluster: Ray refuses `ray start --address` on macOS unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, and
    without it a Mac's Ray process advertises 127.0.0.1, which no other machine can reach; on Linux the
    variable is Ray's default. A cluster without token authentication runs anyone's code on every node:
    refused here.

    Either way gRPC logs errors only (GRPC_VERBOSITY), Serve's loops wake less often when idle
    (IDLE_RAY_SERVE), and Serve's HTTP proxy applies the write deadline
    (api/proxy.py): Ray reads the variable when the proxy starts, from the environment of the Ray node it
    runs on. Alone that is this process's; in a cluster it is the head's `ray start` (docs/pages/cluster.md's
    recipe exports it there too)."""
    # gRPC's INFO lines ("skipping fork() handlers", one each time a replica starts ffmpeg) are noise in the
    # server's terminal and log; its warnings and errors still show. An operator's own value wins.
    environ.setdefault("GRPC_VERBOSITY", "ERROR")
    for name, value in IDLE_RAY_SERVE.items():
        environ.setdefault(name, value)
    callback = environ.setdefault(PROXY_CALLBACK_VARIABLE, PROXY_CALLBACK)
    if callback != PROXY_CALLBACK:
        print(
            f"sesame-tts: warning: {PROXY_CALLBACK_VARIABLE}={callback} replaces {PROXY_CALLBACK}: a client "
            "that stops reading keeps its response in memory as long as its connection lasts",
            file=sys.stderr,
        )
    address = environ.get("RAY_ADDRESS", "").strip()
    if address in ("", "local"):
        environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        private_ray_dir(environ)
        return
    if environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        raise SystemExit(
            "sesame-tts: cannot start: RAY_ADDRESS names a cluster and RAY_AUTH_MODE=disabled; a Ray "
            'cluster on a network needs token authentication (see the README, "Several machines")'
        )
    environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")


def print_env(settings: Settings) -> None:
    """KEY=VALUE lines for ops/sesame-tts, which reads them with `read` (never `eval`): no value may hold a
    line break (HOST and PORT are validated by Settings)."""
    values = {
        "HOST": settings.host,
        "PORT": str(settings.port),
        "CACHE_DIR": str(settings.cache_dir),
        "URL": base_url(settings),
        # Home Assistant's port ("" when off); the listener may face loopback only (api/discovery.py)
        "WYOMING": f"{settings.host}:{settings.wyoming_port}" if settings.wyoming_port else "",
    }
    for key, value in values.items():
        if "\n" in value or "\r" in value:
            raise SystemExit(f"sesame-tts: cannot start: {key} must not contain a line break")
        print(f"{key}={value}")


def control(args, settings: Settings) -> int:
    """The control script's questions about the service: --pid, --stop, --wait-stopped, --render,
    --check-paths."""
    pid_file = settings.pid_file
    if args.pid:
        pid = running_pid(pid_file)
        if pid is not None:
            print(pid)
        return 0 if pid is not None else 1
    if args.stop is not None:
        print(f"sesame-tts: {service.stop(pid_file, args.stop)}")
        return 0
    if args.wait_stopped is not None:
        return 0 if service.wait_stopped(pid_file, args.wait_stopped) else 1
    if args.render == "unit":
        sys.stdout.write(service.render_unit(PROJECT_ROOT, settings.cache_dir))
        return 0
    if args.render:
        import getpass
        import pwd

        user = os.environ.get("SUDO_USER") or getpass.getuser()  # the daemon runs as the user who installs it
        home = Path(pwd.getpwnam(user).pw_dir)
        plist = service.render_plist(PROJECT_ROOT, settings.cache_dir, args.render == "plist-boot", user, home)
        sys.stdout.buffer.write(plist)
        return 0
    home = Path.home()
    paths = {"the checkout": PROJECT_ROOT, "CACHE_DIR": settings.cache_dir, "VOICES_DIR": settings.voices_dir}
    if Path(settings.model_id).expanduser().exists():
        paths["MODEL_ID"] = Path(settings.model_id)
    for name, path in paths.items():
        if (folder := service.protected_folder(path, home)) is not None:
            print(
                f"sesame-tts: {name} ({path}) is inside {folder}, which macOS keeps from background services "
                '(the server would fail at start with "Operation not permitted"). Move it elsewhere (for '
                "example ~/sesame-tts), or give the Python in .venv Full Disk Access first.",
                file=sys.stderr,
            )
            return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Start Sesame TTS (serve run with HOST/PORT applied).")
    parser.add_argument("config", nargs="?", type=Path, default=PROJECT_ROOT / "serve_config.yaml")
    parser.add_argument(
        "--service",
        action="store_true",
        help="supervise: PID file and rotated log in CACHE_DIR, graceful stop on SIGTERM",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="with --service: start the supervisor in a session of its own and return its pid",
    )
    parser.add_argument("--print-env", action="store_true", help="print HOST, PORT, CACHE_DIR and URL for scripts")
    parser.add_argument("--pid", action="store_true", help="print the running supervisor's pid (exit 1: none)")
    parser.add_argument("--stop", type=float, metavar="TIMEOUT", help="stop the running supervisor")
    parser.add_argument("--wait-stopped", type=float, metavar="TIMEOUT", help="wait until no supervisor runs")
    parser.add_argument(
        "--render",
        choices=("plist", "plist-boot", "unit"),
        help="print the launchd job (login agent or boot daemon) or the systemd unit, paths filled in",
    )
    parser.add_argument(
        "--check-paths",
        action="store_true",
        help="refuse folders macOS keeps from background services (before a launchd install)",
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.load()
        export_ray_variables()
        if args.print_env:
            print_env(settings)
            return
        if args.pid or args.stop is not None or args.wait_stopped is not None or args.render or args.check_paths:
            sys.exit(control(args, settings))
        prepare_ray_environment()
        voices = VoiceLibrary.load(settings.voices_dir)
        voices.resolve(settings.default_voice)
    except SystemExit:
        raise
    except Exception as exc:
        sys.exit(f"sesame-tts: cannot start: {getattr(exc, 'message', exc)}")
    if args.detach:
        if (pid := running_pid(settings.pid_file)) is not None:
            sys.exit(f"sesame-tts: already running (pid {pid})")
        print(service.detach(args.config, settings.cache_dir))
        return
    if shutil.which(settings.ffmpeg_path) is None:
        print(
            f"sesame-tts: warning: {settings.ffmpeg_path} not found; /health will report 503 until it is installed",
            file=sys.stderr,
        )
    config = render_config(settings, args.config)
    serve = shutil.which("serve", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if serve is None:
        sys.exit("sesame-tts: cannot start: the `serve` command (ray[serve]) is not installed")
    lan = " (and this machine's network addresses)" if settings.host in ("0.0.0.0", "::") else ""
    print(f"sesame-tts: serving {settings.model_id} on {base_url(settings)}/v1{lan}", file=sys.stderr)
    print(
        f"sesame-tts: voice presets {', '.join(voices.names())} from {settings.voices_dir} (read at start: restart "
        "after changing them)",
        file=sys.stderr,
    )
    os.chdir(PROJECT_ROOT)
    command = [serve, "run", str(config)]
    if args.service:
        sys.exit(supervise(command, settings))
    os.execv(serve, command)


if __name__ == "__main__":
    main()
