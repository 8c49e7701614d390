"""Process look-ups the supervisor, the local cluster, the benchmark and the tests share, through psutil.

One implementation for Linux and macOS: no `/proc` (macOS has none), no `ps` parsing (BSD `ps` has no `sid`
keyword, and its `sess` column is a kernel pointer, not a session id), no `setsid(1)` (macOS ships none).
Sessions are how we track what we started: a server or a Ray node is started with `start_new_session`, and
everything it starts stays in that session unless it starts a session of its own (Ray's workers only take
process groups of their own), even once its parent is gone and it has been re-parented. Nothing here looks a
process up by name: callers pass the pid of a process they started.
"""

from __future__ import annotations

import os
import signal

import psutil


def _session_of(proc: psutil.Process) -> int | None:
    try:
        return os.getsid(proc.pid)
    except OSError:  # gone, or not ours to see
        return None


def _alive(proc: psutil.Process) -> bool:
    """Running, not a zombie (a killed process waits there for its parent, or launchd/init, to reap it)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def is_running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie has exited: it only waits to be reaped)."""
    try:
        return _alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def session_processes(sid: int) -> list[psutil.Process]:
    """Every live process of session `sid` (the pid of a process started with start_new_session)."""
    return [p for p in psutil.process_iter() if _session_of(p) == sid and _alive(p)]


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid`: its leader's process group first, then every member that
    moved to a group of its own (Ray's workers do)."""
    try:
        os.killpg(sid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in session_processes(sid):
        try:
            proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def children(pid: int) -> list[int]:
    """The pids of `pid`'s live direct children."""
    try:
        return [c.pid for c in psutil.Process(pid).children() if _alive(c)]
    except psutil.NoSuchProcess:
        return []


def child_names(pid: int) -> set[str]:
    """The executable names of `pid`'s live direct children."""
    names = set()
    try:
        kids = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return names
    for child in kids:
        try:
            if _alive(child):
                names.add(child.name())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return names


def tree_rss_bytes(pid: int) -> tuple[int, int]:
    """Resident memory of `pid` and all its descendants, and how many processes that is."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    return rss_bytes(procs), len(procs)


def rss_bytes(procs: list[psutil.Process]) -> int:
    """Resident memory of `procs` together (those gone meanwhile count 0)."""
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time `pid` has used."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def resident_bytes(pid: int | None = None) -> int | None:
    """Resident set size of `pid` (default: this process)."""
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
