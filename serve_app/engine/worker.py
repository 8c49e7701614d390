"""The one thread that owns a replica's MLX work.

MLX streams are thread-local and Metal breaks under concurrent use, so loading, prompt encoding and every
generation step run on a single thread. Calls run in the order they were submitted; generation jobs go to
the batch scheduler (attached once the model has loaded), and the thread runs one batch step at a time,
taking new jobs in between, so a request joins the batch at the next frame. Async callers get results
through an asyncio queue; a job carries a cancel event that the scheduler checks before every frame, and
the async side sets it in `finally`, so a client that goes away leaves the batch within a frame.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional

import mlx.core as mx

from .scheduler import END, BatchScheduler, GenerationJob

logger = logging.getLogger("sesame_tts")


@dataclass
class _CallJob:
    fn: Callable[[], Any]
    future: concurrent.futures.Future


class ModelWorker:
    """A single daemon thread: submitted calls, and batch steps for the generation jobs."""

    def __init__(self, device: Optional[mx.DeviceType] = None, name: str = "mlx-worker"):
        self._device = device
        self._jobs: "queue.Queue[Any]" = queue.Queue()
        self.scheduler: Optional[BatchScheduler] = None  # set on this thread once the model is loaded
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet in the batch."""
        return self._jobs.qsize() + (len(self.scheduler.waiting) if self.scheduler else 0)

    @property
    def generating(self) -> int:
        """Requests in the batch now."""
        return self.scheduler.generating if self.scheduler else 0

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the worker thread; the future holds its result or exception."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put(_CallJob(fn, future))
        return future

    async def stream(self, request) -> AsyncIterator[Any]:
        """Generate `request` in the batch, yielding its PCM chunks and `Usage` here as they come."""
        loop, results, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def post(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(results.put_nowait, item)
            except RuntimeError:  # the caller's loop is gone; nobody is listening
                cancel.set()

        self._jobs.put(GenerationJob(request, post, cancel.is_set))
        try:
            while True:
                item = await results.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        if self._device is not None:
            mx.set_default_device(self._device)
        while True:
            busy = self.scheduler is not None and self.scheduler.active
            try:
                job = self._jobs.get(block=not busy)
                while True:
                    if job is None:
                        return
                    self._take(job)
                    job = self._jobs.get_nowait()
            except queue.Empty:
                pass
            if self.scheduler is not None and self.scheduler.active:
                self.scheduler.step()

    def _take(self, job: Any) -> None:
        if isinstance(job, _CallJob):
            if job.future.set_running_or_notify_cancel():
                try:
                    job.future.set_result(job.fn())
                except BaseException as exc:  # handed to the caller, never lost
                    job.future.set_exception(exc)
        elif self.scheduler is None:
            job.post(RuntimeError("the model is not loaded"))
        else:
            self.scheduler.add(job)
