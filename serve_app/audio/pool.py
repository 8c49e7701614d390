"""ffmpeg processes started ahead of need.

Starting ffmpeg and its encoder takes ~55 ms here before it can emit a byte, which was most of what the
server added to the first byte of an mp3 or opus response over raw PCM (measured: 56-85 ms from spawn to the
first mp3/opus bytes of two frames, 1.5-2.2 ms when the process was already running). So the encoder keeps
FFMPEG_WARM idle processes per command line it has used (responses at normal speed: a finite set, one per
format), started and waiting on stdin; a response takes one, and a replacement starts once the response's
first audio is out.
At most MAX_COMMANDS command lines are kept warm, the least recently used dropped first. An idle process
holds no audio and no state: taking it is the same as starting it, minus the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from typing import Optional

from serve_app.core.constants import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)

MAX_COMMANDS = 8

Process = asyncio.subprocess.Process


async def start(cmd: list[str]) -> Process:
    return await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


async def kill(proc: Optional[Process]) -> None:
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(proc.wait(), timeout=5)


class WarmProcesses:
    """Idle ffmpeg processes per command line, on one asyncio loop (the encoder replica's)."""

    def __init__(self, per_command: int):
        self.per_command = per_command
        self._idle: OrderedDict[tuple[str, ...], list[Process]] = OrderedDict()
        self._starting: dict[tuple[str, ...], int] = {}
        self._tasks: set[asyncio.Task] = set()

    @property
    def idle(self) -> int:
        return sum(len(procs) for procs in self._idle.values())

    @property
    def pids(self) -> list[int]:
        """The idle processes' pids (health reports them: ffmpeg processes of ours that serve nobody yet)."""
        return sorted(proc.pid for procs in self._idle.values() for proc in procs)

    async def take(self, cmd: list[str], keep_warm: bool = True) -> Process:
        """A running ffmpeg for `cmd`: an idle one if there is one, else a new one. No replacement starts
        here: the caller calls `fill` once its response's first audio is out (starting ffmpeg costs ~50 ms of
        CPU and a fork of the replica's process, which the model's first frames and the first bytes would
        otherwise wait for on a small machine). `keep_warm=False` (a one-off command line) takes nothing
        from the pool."""
        key = tuple(cmd)
        if not (keep_warm and self.per_command):
            return await start(cmd)
        procs = self._idle.setdefault(key, [])
        self._idle.move_to_end(key)
        proc = None
        while procs and proc is None:
            candidate = procs.pop(0)
            if candidate.returncode is None:
                proc = candidate
            else:  # it died while idle (killed from outside): start afresh
                await kill(candidate)
        return proc if proc is not None else await start(cmd)

    def fill(self, key: tuple[str, ...]) -> None:
        """Start idle processes for `key` in the background until it has `per_command`."""
        if key not in self._idle:
            self._idle[key] = []
        missing = self.per_command - len(self._idle[key]) - self._starting.get(key, 0)
        for _ in range(max(0, missing)):
            self._starting[key] = self._starting.get(key, 0) + 1
            self._background(self._start_idle(key))
        while len(self._idle) > MAX_COMMANDS:
            _, dropped = self._idle.popitem(last=False)
            for proc in dropped:
                self._background(kill(proc))

    def _background(self, coro) -> None:
        """Run `coro` on the loop, holding its task until it ends (the loop keeps only weak references)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_idle(self, key: tuple[str, ...]) -> None:
        try:
            proc = await start(list(key))
        except Exception as exc:  # the request path will report ffmpeg's problem when it starts one itself
            logger.warning("could not start a warm ffmpeg: %s", exc)
            return
        finally:
            self._starting[key] -= 1
        if key in self._idle and len(self._idle[key]) < self.per_command:
            self._idle[key].append(proc)
        else:
            await kill(proc)

    def kill_now(self) -> None:
        """Kill every idle process without waiting (for a replica going away outside its loop)."""
        for procs in self._idle.values():
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

    async def close(self) -> None:
        procs = [proc for group in self._idle.values() for proc in group]
        self._idle.clear()
        for proc in procs:
            await kill(proc)
