"""The one thread that owns a replica's MLX work.

MLX streams are thread-local and Metal breaks under concurrent use, so loading, prompt encoding and every
generation step run on a single thread, in the order they were submitted. Async callers get results
through an asyncio queue; a job carries a cancel event that the generation loop checks before every frame,
and the async side sets it in `finally`, so a client that goes away stops its generation within a frame.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Optional

import mlx.core as mx

logger = logging.getLogger("sesame_tts")

_END = object()


@dataclass
class _StreamJob:
    make: Callable[[Callable[[], bool]], Iterator[Any]]
    loop: asyncio.AbstractEventLoop
    results: asyncio.Queue
    cancel: threading.Event = field(default_factory=threading.Event)

    def post(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.results.put_nowait, item)
        except RuntimeError:  # the caller's loop is gone; nobody is listening
            self.cancel.set()


@dataclass
class _CallJob:
    fn: Callable[[], Any]
    future: concurrent.futures.Future


class ModelWorker:
    """A single daemon thread running submitted calls and generator jobs one at a time."""

    def __init__(self, device: Optional[mx.DeviceType] = None, name: str = "mlx-worker"):
        self._device = device
        self._jobs: "queue.Queue[Any]" = queue.Queue()
        self.busy = False  # a job is running now
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Jobs submitted and not yet started."""
        return self._jobs.qsize()

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the worker thread; the future holds its result or exception."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put(_CallJob(fn, future))
        return future

    async def stream(self, make: Callable[[Callable[[], bool]], Iterator[Any]]) -> AsyncIterator[Any]:
        """Iterate `make(cancelled)` on the worker thread, yielding its items here as they come."""
        job = _StreamJob(make, asyncio.get_running_loop(), asyncio.Queue())
        self._jobs.put(job)
        try:
            while True:
                item = await job.results.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancel.set()

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        if self._device is not None:
            mx.set_default_device(self._device)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self.busy = True
            try:
                if isinstance(job, _CallJob):
                    self._run_call(job)
                else:
                    self._run_stream(job)
            finally:
                self.busy = False

    @staticmethod
    def _run_call(job: _CallJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn())
        except BaseException as exc:  # handed to the caller, never lost
            job.future.set_exception(exc)

    @staticmethod
    def _run_stream(job: _StreamJob) -> None:
        if job.cancel.is_set():
            job.post(_END)
            return
        try:
            # closing(): a generator left early still runs its `finally` (cache release) right here.
            with contextlib.closing(job.make(job.cancel.is_set)) as items:
                for item in items:
                    job.post(item)
                    if job.cancel.is_set():
                        break
            job.post(_END)
        except BaseException as exc:
            logger.debug("generation job failed", exc_info=True)
            job.post(exc)
