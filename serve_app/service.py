"""The service around the supervisor: its PID file under a lock, detaching, stopping, and the checks that
`ops/sesame-tts install` makes. Portable to macOS by construction: Python and psutil, no `setsid(1)`, no `ps`.

The PID file (CACHE_DIR/server.pid) is held under an exclusive `flock` for the supervisor's whole life, so
"is it running?" is answered by the lock, never by whether the pid in the file happens to be alive: after a
reboot or a crash the file may name a pid that a new, unrelated process now has, and a plain pid check would
then refuse to start, or stop the wrong process. The kernel drops the lock when the supervisor dies, however
it dies.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from serve_app.core.constants import PROJECT_ROOT
from serve_app.core.processes import children, kill_session


class PidLock:
    """The supervisor's claim on its PID file."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: Optional[int] = None

    def acquire(self) -> bool:
        """Take the lock and write our pid; False if a live supervisor holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children (PEP 446)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return False
                raise
            # The file we locked must still be the one at the path: an owner that was releasing it may
            # have unlinked it between our open and our lock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return True

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: nobody can take a file we then remove
        finally:
            os.close(self._fd)
            self._fd = None


def running_pid(path: Path) -> Optional[int]:
    """The pid of the supervisor that holds the PID file's lock, None when none does (no file, or a stale
    one)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted only while nobody holds it exclusively
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            for _ in range(50):  # the owner truncates, then writes: an empty read is that moment
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                if text.isdigit():
                    return int(text)
                time.sleep(0.01)
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def wait_stopped(path: Path, timeout: float) -> bool:
    """Wait until no supervisor holds the PID file; False if one still does after `timeout` s."""
    deadline = time.monotonic() + timeout
    while running_pid(path) is not None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def stop(path: Path, timeout: float) -> str:
    """SIGTERM the supervisor (it drains in-flight responses, then ends Serve and Ray) and wait for it; after
    `timeout` s, SIGKILL it and the session of everything it started. Returns what happened, for the user."""
    pid = running_pid(path)
    if pid is None:
        return "not running"
    started = time.monotonic()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "not running"
    if wait_stopped(path, timeout):
        return f"stopped in {time.monotonic() - started:.0f}s"
    sessions = children(pid)  # `serve run`, which leads a session of its own
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for sid in sessions:
        kill_session(sid)
    wait_stopped(path, 10)
    return f"killed after {timeout:.0f}s"


def detach(config: Path, cache_dir: Path) -> int:
    """Start the supervisor in a session of its own, detached from this terminal (what `setsid(1)` plus
    `nohup` do, which macOS lacks), its early output appended to CACHE_DIR/launch.out; returns its pid."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / "launch.out", "ab") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "serve_app.launch", "--service", str(config)],
            cwd=PROJECT_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return child.pid


# Folders macOS's privacy protection (TCC) keeps from a launchd job unless the user grants it access by hand;
# a service reading its code, model or cache there fails at start with "Operation not permitted".
PROTECTED_FOLDERS = ("Desktop", "Documents", "Downloads", "Library/Mobile Documents", "Library/CloudStorage")


def protected_folder(path: Path, home: Path) -> Optional[Path]:
    """The privacy-protected folder of `home` that `path` lies in (links resolved), None if none."""
    resolved = path.expanduser().resolve()
    for name in PROTECTED_FOLDERS:
        for base in {home / name, (home / name).resolve()}:
            if resolved == base or base in resolved.parents:
                return home / name
    return None


LABEL = "com.sesame-tts"


def render_plist(root: Path, cache_dir: Path, boot: bool, user: str, home: Path) -> bytes:
    """ops/launchd's template with the real paths, as launchd reads it (plistlib escapes every path). `boot`:
    the LaunchDaemon form, which starts at boot without a login and runs as `user` with `home`."""
    import plistlib

    template = plistlib.loads((root / "ops" / "launchd" / f"{LABEL}.plist").read_bytes())

    def fill(value):
        if isinstance(value, str):
            return value.replace("@ROOT@", str(root)).replace("@CACHE_DIR@", str(cache_dir))
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    plist = fill(template)
    if boot:
        plist["UserName"] = user
        plist["EnvironmentVariables"]["HOME"] = str(home)  # set, not assumed: CACHE_DIR's default and ~/.ray follow it
    return plistlib.dumps(plist)


def render_unit(root: Path, cache_dir: Path) -> str:
    """ops/systemd's user unit with the real paths."""
    text = (root / "ops" / "systemd" / "sesame-tts.service").read_text()
    return text.replace("@ROOT@", str(root)).replace("@CACHE_DIR@", str(cache_dir))
