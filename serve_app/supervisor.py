"""The service's supervisor: `serve run` under watch, its output in a rotated log, a graceful stop.

It refuses to start twice (the PID lock), copies the server's output into a rotated log, and on SIGTERM
lets in-flight streams finish within the grace period before everything it started is gone. It also
watches the server, because `serve run` outlives the Ray cluster under it (measured: with its raylet and
GCS killed, the replicas went on answering /health for 60 s before `serve run` gave up) and launchd's
KeepAlive or systemd's Restart only act when the supervised process exits: when a Ray core process that
`serve run` started exits, or when the server, having answered once, stops answering at all, the
supervisor ends everything and exits non-zero at once.
"""

from __future__ import annotations

import json
import logging.handlers
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Optional

from serve_app.core.constants import STOP_GRACE_S, STOP_KILL_AFTER_S
from serve_app.core.logs import escape_controls
from serve_app.core.processes import child_names, kill_session
from serve_app.core.settings import Settings
from serve_app.service import PidLock, running_pid

LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5
# A server that has answered once and then fails this many probes in a row (one every WATCH_INTERVAL_S,
# each given WATCH_TIMEOUT_S) is gone: no answer at all, not even a 503. So is a cluster whose core
# processes, started by `serve run` (a local cluster; none when it joins one started with `ray start`), exit.
CLUSTER_PROCESSES = ("gcs_server", "raylet")
WATCH_INTERVAL_S = 5.0
WATCH_TIMEOUT_S = 5.0
WATCH_FAILURES = 3
CLUSTER_GONE_EXIT = 75  # EX_TEMPFAIL: the service manager restarts us
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_DASHBOARD = re.compile(r"View the dashboard at (https?://\S+)")


def base_url(settings: Settings) -> str:
    """Where this machine reaches the server (the wildcard addresses mean loopback)."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://[{host}]:{settings.port}" if ":" in host else f"http://{host}:{settings.port}"


def health_url(settings: Settings) -> str:
    return f"{base_url(settings)}/health"


# Probes of our own server never go through a proxy (macOS hands urllib the system's proxy settings).
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def server_answers(settings: Settings, timeout: float = WATCH_TIMEOUT_S) -> bool:
    """Whether anything answers HTTP on the server's port (a 503 is an answer; a closed port is not)."""
    try:
        with _DIRECT.open(health_url(settings), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def cluster_processes(parent: int) -> set[str]:
    """Which of Ray's core processes run as live direct children of `parent` (`serve run`)."""
    return child_names(parent) & set(CLUSTER_PROCESSES)


def in_flight(settings: Settings) -> Optional[int]:
    """Speech requests the running server is still serving (None when it does not answer)."""
    try:
        with _DIRECT.open(health_url(settings), timeout=2) as response:
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


def _server_log(settings: Settings) -> logging.Logger:
    """The rotated server.log in CACHE_DIR: the server's output, line by line, and the supervisor's own."""
    log = logging.getLogger("sesame_tts.server_log")
    handler = logging.handlers.RotatingFileHandler(
        settings.cache_dir / "server.log", maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8"
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


class Supervisor:
    """`serve run` under watch: started in a session of its own, its output copied into the rotated log, its
    cluster watched (`watch`, a thread), and stopped gracefully on a signal (`stop`: drain, then Serve's own
    shutdown, then whatever is left). `run` returns the exit code for the service manager."""

    def __init__(self, command: list[str], settings: Settings):
        self.command, self.settings = command, settings
        self.dashboard_file = settings.cache_dir / "dashboard.url"  # for `ops/sesame-tts status`
        self.stopping = threading.Event()  # a signal asked us to stop
        self.gone = threading.Event()  # the watch found the cluster gone
        self.log = logging.getLogger("sesame_tts.server_log")  # its file once this one holds the lock
        self.child: Optional[subprocess.Popen] = None

    def run(self) -> int:
        lock = PidLock(self.settings.pid_file)
        if not lock.acquire():
            sys.exit(f"sesame-tts: already running (pid {running_pid(lock.path)}, {lock.path})")
        self.log = _server_log(self.settings)
        self.dashboard_file.unlink(missing_ok=True)
        self.settings.drain_flag.unlink(missing_ok=True)
        # serve run shuts Serve down (serve.shutdown()) only on SIGINT; SIGTERM kills it outright. Neither waits
        # for streams in flight, hence our drain first. A background process inherits SIGINT ignored: reset it.
        self.child = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.stop)
        threading.Thread(target=self.watch, name="watchdog", daemon=True).start()
        try:
            self._copy_output()
            code = self.child.wait()
            kill_session(self.child.pid)  # anything the cluster left behind
            self.log.info("sesame-tts: stopped (exit %s)", code)
            if self.gone.is_set():
                return CLUSTER_GONE_EXIT
            return 0 if self.stopping.is_set() else code
        finally:
            self.settings.drain_flag.unlink(missing_ok=True)
            self.dashboard_file.unlink(missing_ok=True)
            lock.release()

    def _copy_output(self) -> None:
        for raw in iter(self.child.stdout.readline, b""):
            line = escape_controls(_ANSI.sub("", raw.decode(errors="replace").rstrip("\r\n")))
            self.log.info("%s", line)
            if match := _DASHBOARD.search(line):  # ours: other clusters on this machine may hold the default port
                self.dashboard_file.write_text(match.group(1) + "\n")

    def watch(self) -> None:
        """End everything when the cluster's core processes exit, or when the server, having answered
        once, stops answering."""
        child, answered, failures, seen = self.child, False, 0, set()
        while not self.stopping.wait(WATCH_INTERVAL_S) and child.poll() is None:
            running = cluster_processes(child.pid)
            seen |= running
            if server_answers(self.settings):
                answered, failures = True, 0
            else:
                failures += answered
            lost = seen - running
            if lost:
                why = f"Ray's {' and '.join(sorted(lost))} exited"
            elif failures >= WATCH_FAILURES:
                why = f"the server stopped answering on port {self.settings.port} ({failures} probes)"
            else:
                continue
            if self.stopping.is_set():
                return
            self.gone.set()
            self.log.info(
                "sesame-tts: %s: the Ray cluster is gone. Exiting so the service manager restarts the server.", why
            )
            kill_session(child.pid)
            return

    def stop(self, signum, frame) -> None:
        """The signal handler: the graceful stop, once, on a thread of its own."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.log.info("sesame-tts: stopping (signal %d); in-flight responses get up to %d s", signum, STOP_GRACE_S)
        # daemon: must not keep this process alive once serve run has exited
        threading.Thread(target=self._shut_down, name="shutdown", daemon=True).start()

    def _shut_down(self) -> None:
        drain(self.settings, self.log, STOP_GRACE_S)
        self.child.send_signal(signal.SIGINT)  # serve run's own shutdown (serve.shutdown())
        time.sleep(STOP_KILL_AFTER_S)
        kill_session(self.child.pid)


def supervise(command: list[str], settings: Settings) -> int:
    """Run `command` under a `Supervisor`; its exit code."""
    return Supervisor(command, settings).run()
