"""The one thread that owns a replica's MLX work.

MLX streams are thread-local and Metal breaks under concurrent use, so loading, prompt encoding and every
generation step run on a single thread. Calls run in the order they were submitted; generation jobs go to
the batch scheduler (attached once the model has loaded), and the thread runs one batch step at a time,
taking new jobs in between, so a request joins the batch at the next frame. Async callers get results
through an asyncio queue; a job carries a cancel event that the scheduler checks before every frame, and
the async side sets it in `finally`, so a client that goes away leaves the batch within a frame.

A failure is contained to what it concerns: a job that cannot be taken fails only its own request, a step
that fails ends only the requests in it, and the thread itself never ends on an exception. Its heartbeat
(`liveness`) says whether it is alive, what it is doing and for how long, which is what the replica's
health check reads: a thread that died or hangs inside a task makes the replica unhealthy, and Serve
replaces it. Should the thread end anyway, every waiting caller gets an error instead of waiting forever.

An idle worker blocks on its queue and never wakes by itself, and it is stopped at interpreter exit: a
thread that holds MLX state and wakes while Python finalizes is torn down mid-call, which aborts the
process (exit 134, "terminate called without an active exception").
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx

from serve_app.core.constants import LOGGER_NAME
from serve_app.core.errors import ServiceUnavailableError
from serve_app.core.messages import END, received
from serve_app.engine.scheduler import BatchScheduler, GenerationJob

logger = logging.getLogger(LOGGER_NAME)

EXIT_JOIN_S = 5.0  # at interpreter exit, how long an idle or finishing worker gets to end


def _release_thread_mlx_state() -> None:
    """Finish this thread's MLX work and destroy the streams it created, on this thread, before it ends.

    MLX keeps each thread's streams (and on the CPU backend a C++ thread per stream) in thread-local
    storage. Left to the thread-local destructors, they ran after `join()` had returned and raced the
    interpreter's own teardown, which aborted the process (exit 134, "terminate called without an active
    exception"). Released here, nothing of MLX is left for those destructors, so `join()` is the whole wait
    on every system (no /proc, which macOS lacks)."""
    try:
        mx.synchronize()
        mx.clear_streams()
    except Exception as exc:  # a broken device must not hide why the thread ended
        logger.warning("releasing the model thread's MLX streams failed: %s", exc)


@dataclass
class _CallJob:
    fn: Callable[[], Any]
    future: concurrent.futures.Future
    label: str
    step_after: bool = False  # the batch steps before the next job (long work split into pieces)


@dataclass(frozen=True)
class Liveness:
    """The worker's heartbeat as health checks read it."""

    alive: bool
    task: Optional[str]  # what it is doing now ("step", "admit", a call's label), None when idle
    task_s: float  # how long the current task has run
    tasks_done: int  # tasks finished so far: a count that moves is a thread that works
    error: Optional[str] = None  # why the thread ended, if it did

    def as_dict(self) -> dict:
        return {
            "alive": self.alive,
            "task": self.task,
            "task_s": round(self.task_s, 2),
            "tasks_done": self.tasks_done,
            **({"error": self.error} if self.error else {}),
        }


class ModelWorker:
    """A single daemon thread: submitted calls, and batch steps for the generation jobs."""

    def __init__(self, device: Optional[mx.DeviceType] = None, name: str = "mlx-worker"):
        self._device = device
        self._jobs: queue.Queue[Any] = queue.Queue()
        self.scheduler: Optional[BatchScheduler] = None  # set on this thread once the model is loaded
        self._task: Optional[str] = None
        self._task_since = 0.0
        self._tasks_done = 0
        self._ended: Optional[str] = None  # set when the thread has ended
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        atexit.register(self._stop_at_exit)

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet in the batch."""
        return self._jobs.qsize() + (len(self.scheduler.waiting) if self.scheduler else 0)

    @property
    def generating(self) -> int:
        """Requests in the batch now."""
        return self.scheduler.generating if self.scheduler else 0

    def liveness(self) -> Liveness:
        now = time.monotonic()
        task = self._task
        return Liveness(
            alive=self._thread.is_alive() and self._ended is None,
            task=task,
            task_s=now - self._task_since if task else 0.0,
            tasks_done=self._tasks_done,
            error=self._ended,
        )

    def submit(self, fn: Callable[[], Any], label: str = "call", step_after: bool = False) -> concurrent.futures.Future:
        """Run `fn()` on the worker thread; the future holds its result or exception. `label` names the
        task in the heartbeat while it runs. `step_after`: the batch takes a step before any further job
        (a long piece of work submitted piece by piece never holds the streams up for more than a piece)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._ended is not None:
            future.set_exception(self._dead_error())
        else:
            self._jobs.put(_CallJob(fn, future, label, step_after))
        return future

    async def stream(self, request) -> AsyncIterator[Any]:
        """Generate `request` in the batch, yielding its PCM chunks and `Usage` here as they come."""
        if self._ended is not None:
            raise self._dead_error()
        loop, results, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def post(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(results.put_nowait, item)
            except RuntimeError:  # the caller's loop is gone; nobody is listening
                cancel.set()

        self._jobs.put(GenerationJob(request, post, cancel.is_set))
        if self._ended is not None:  # it ended between the check above and the put: nobody takes the job
            self._drain(self._dead_error())
        try:
            while True:
                item = received(await results.get())
                if item is END:
                    return
                yield item
        finally:
            cancel.set()

    def stop(self) -> None:
        self._jobs.put(None)

    def _stop_at_exit(self) -> None:
        if self._thread.is_alive():
            self.stop()
            self._thread.join(EXIT_JOIN_S)

    def _dead_error(self) -> ServiceUnavailableError:
        return ServiceUnavailableError(
            f"The model worker has stopped ({self._ended}); the replica is being replaced, retry shortly.",
            code="model_worker_stopped",
        )

    def _begin(self, task: str) -> None:
        self._task, self._task_since = task, time.monotonic()

    def _end_task(self) -> None:
        self._task = None
        self._tasks_done += 1

    def _run(self) -> None:
        reason = "stopped"
        try:
            if self._device is not None:
                mx.set_default_device(self._device)
            while self._loop_once():
                pass
        except BaseException as exc:  # nothing below should get here; if it does, nobody may hang on it
            reason = f"{type(exc).__name__}: {exc}"
            logger.critical("the model worker thread ended: %s", reason, exc_info=exc)
        finally:
            self._ended = reason
            self._fail_everything(self._dead_error())
            _release_thread_mlx_state()

    def _loop_once(self) -> bool:
        """Take every job that is there (waiting for one when idle), then run one batch step; False on
        stop."""
        busy = self.scheduler is not None and self.scheduler.active
        try:
            job = self._jobs.get_nowait() if busy else self._jobs.get()
            while True:
                if job is None:
                    return False
                self._take(job)
                if isinstance(job, _CallJob) and job.step_after:
                    break
                job = self._jobs.get_nowait()
        except queue.Empty:
            pass
        if self.scheduler is not None and self.scheduler.active:
            self._begin("step")
            try:
                self.scheduler.step()
            except Exception as exc:  # step() contains its own failures; this is the net under it
                logger.error("a batch step failed outside its own error handling", exc_info=exc)
                self.scheduler.fail_all(exc)
            finally:
                self._end_task()
        return True

    def _take(self, job: Any) -> None:
        """One job, isolated: whatever it raises goes to that job's caller and nowhere else."""
        if isinstance(job, _CallJob):
            if job.future.set_running_or_notify_cancel():
                self._begin(job.label)
                try:
                    job.future.set_result(job.fn())
                except BaseException as exc:  # handed to the caller, never lost
                    job.future.set_exception(exc)
                finally:
                    self._end_task()
            return
        self._begin("admit")
        try:
            if self.scheduler is None:
                raise ServiceUnavailableError("The model is not loaded.", code="model_not_ready")
            self.scheduler.add(job)
        except Exception as exc:
            logger.warning("request could not join the batch: %s: %s", type(exc).__name__, exc)
            job.post(exc)
        finally:
            self._end_task()

    def _fail_everything(self, error: Exception) -> None:
        """The thread is ending: every request in the batch and every queued job gets `error`."""
        if self.scheduler is not None:
            try:
                self.scheduler.fail_all(error)
            except Exception:  # the batch's own state may be what broke; the queue still gets its answers
                logger.exception("could not fail the batch's requests")
        self._drain(error)

    def _drain(self, error: Exception) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, _CallJob):
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(error)
            elif job is not None:
                job.post(error)
