"""CSMModel: the MLX CSM deployment (exactly one replica).

The checkpoint loads in the background on the replica's MLX thread, so the replica starts at once and
/health can say "loading" (with download progress) or why loading failed instead of Serve restarting a
broken replica forever. `generate` is an async generator (a sync one keeps running after the client has
gone). `check_health`, which Serve calls every few seconds, fails when the MLX thread has died or hangs in
one task, so Serve replaces the replica.

This module is imported by the app builder, which runs no MLX: the engine is imported on the replica only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Optional

from serve_app.core.constants import LOGGER_NAME, MODEL_NAME
from serve_app.core.errors import APIError, errors_as_values
from serve_app.core.health import ReplicaHealth
from serve_app.core.logs import configure_logging
from serve_app.core.messages import StreamItem, SynthesisRequest
from serve_app.core.observability import set_model_load
from serve_app.core.settings import Settings
from serve_app.model import registry as replicas
from serve_app.model.lifecycle import Lifecycle, ModelState
from serve_app.model.loading import load_engine
from serve_app.voices.presets import VoiceLibrary

if TYPE_CHECKING:
    from serve_app.engine.csm import CSMEngine

logger = logging.getLogger(LOGGER_NAME)

GIL_SWITCH_INTERVAL_S = 0.0005
LOAD_TASK = "load"  # the worker task that may take as long as a first download does


def _replica_id(model: CSMModel) -> str:
    """Serve's id of this replica (a process-unique one in Serve's local testing mode)."""
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"local-{id(model):x}"


def _node() -> dict:
    """The Ray node this replica runs on (its id and address); "local" without a cluster."""
    try:
        import ray

        if ray.is_initialized():
            return {"id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}
    except Exception:
        pass
    return {"id": "local", "ip": "127.0.0.1"}


class WorkerUnhealthy(RuntimeError):
    """Raised by `check_health`: Serve then marks the replica unhealthy and replaces it."""


class CSMModel:
    def __init__(self, settings: Settings, voices: VoiceLibrary, health_key: str = "local"):
        from serve_app.engine.csm import describe_device, select_device
        from serve_app.engine.hub import DownloadProgress
        from serve_app.engine.mlx_memory import memory_report
        from serve_app.engine.worker import ModelWorker

        configure_logging(settings.log_level)
        # The MLX thread runs Python between kernels and holds the GIL; a PCM group it posts reaches this
        # replica's event loop only when the GIL changes hands, after up to one switch interval (5 ms by
        # default; the first byte waited ~5 ms there). With 0.5 ms the tiny-checkpoint throughput stayed
        # within this machine's run-to-run noise (python -m serve_app.tools.bench, three runs).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        settings = settings.with_secrets()  # HF_TOKEN from SECRETS_FILE: never in what Ray shipped
        self._settings = settings
        self._life = Lifecycle()  # LOADING, READY, FAILED, the idle unload's states (lifecycle.py)
        device = select_device(settings.mlx_device)
        self._device_name = describe_device(device)
        self._memory_report = memory_report
        self._downloads = DownloadProgress()
        self._worker = ModelWorker(device)
        self._voices = voices
        self._load_s: Optional[float] = None  # the latest (re)load, warm-up included
        # Every model replica publishes its health for the ingress's /health (model/registry.py).
        self._health_key, self._replica_id, self._node = health_key, _replica_id(self), _node()
        self._served = 0
        self._start_load()
        threading.Thread(target=self._publish_health, name="health-publisher", daemon=True).start()
        if settings.idle_unload_s:
            threading.Thread(target=self._watch_idle, name="idle-unload", daemon=True).start()

    def __del__(self):
        """Serve calls this when the replica shuts down: the MLX thread ends with it."""
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.stop()
            replicas.withdraw(self._health_key, self._replica_id)

    def _publish_health(self) -> None:
        while self._worker.liveness().alive:
            self._publish_now()
            time.sleep(replicas.PUBLISH_EVERY_S)

    def _publish_now(self) -> None:
        """Also called on every change of state (loaded, failed, unloaded), so /health never lags it."""
        try:
            replicas.publish(self._health_key, self._replica_id, self.health_info())
        except Exception as exc:  # the GCS briefly away: the entry goes stale and /health says so
            logger.debug("could not publish health: %s", exc)

    def _start_load(self) -> concurrent.futures.Future:
        self._load_started = time.monotonic()
        future = self._worker.submit(lambda: self._load(self._voices), label=LOAD_TASK)
        future.add_done_callback(self._loaded)
        return future

    def _load(self, voices: VoiceLibrary) -> CSMEngine:
        from serve_app.engine.runners import warm_up
        from serve_app.engine.scheduler import BatchScheduler

        engine = load_engine(self._settings, voices, progress=self._downloads)
        warm_up(engine)
        self._worker.scheduler = BatchScheduler(engine, self._settings.max_batch_size)
        return engine

    def _loaded(self, future) -> None:
        exc = future.exception()
        if exc is None:
            self._load_s = time.monotonic() - self._load_started
            self._life.loaded(future.result())
            logger.info("model ready after %.1f s", self._load_s)
        elif isinstance(exc, APIError):  # an expected failure (no network, bad folder): its message says it all
            # Logged before the state changes: whoever sees "failed" finds the log line already written.
            logger.error("model failed to load: %s", exc)
            self._life.failed(str(exc))
        else:
            error = f"{type(exc).__name__}: {exc}"
            logger.error("model failed to load: %s", error, exc_info=exc)
            self._life.failed(error)
        self._publish_now()

    async def generate(self, request: SynthesisRequest) -> AsyncIterator[StreamItem]:
        """Stream s16le PCM chunks for the request, then one `Usage`."""
        await self._acquire()
        try:
            set_model_load(self._worker.waiting + 1, self._worker.generating)
            async for item in self._worker.stream(request):
                set_model_load(self._worker.waiting, self._worker.generating)
                yield item
            self._served += 1
        finally:
            self._release()
            set_model_load(self._worker.waiting, self._worker.generating)

    # --- idle unload (IDLE_UNLOAD_S) --------------------------------------------------------------------

    async def _acquire(self) -> CSMEngine:
        """Count a request in (so no unload starts under it) and reload the weights if they were released."""
        reload = self._life.enter(self._start_load)
        try:
            if reload is not None:
                logger.info("waiting for the model's reload after an idle unload")
                await asyncio.wrap_future(reload)
            return self._life.require_engine()
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        self._life.leave()

    def _watch_idle(self) -> None:
        limit = self._settings.idle_unload_s
        pending: Optional[concurrent.futures.Future] = None
        while self._worker.liveness().alive:
            time.sleep(min(1.0, limit / 4))
            idle = self._life.state() == ModelState.READY and self._life.idle_for() >= limit
            if idle and (pending is None or pending.done()):
                pending = self._worker.submit(self._unload, label="unload")

    def _unload(self) -> bool:
        """On the MLX thread: release the weights, caches and MLX's buffers, unless a request came meanwhile."""
        from serve_app.engine.mlx_memory import release_buffers

        engine = self._life.begin_unload(self._settings.idle_unload_s)
        if engine is None:
            return False
        self._worker.scheduler = None
        del engine
        release_buffers()
        self._life.released()
        self._publish_now()
        logger.info(
            "idle for %g s (IDLE_UNLOAD_S): model weights released; the next request reloads them",
            self._settings.idle_unload_s,
        )
        return True

    @errors_as_values
    async def encode_custom_voice(self, audio, transcript: Optional[str]) -> tuple | APIError:
        """(Mimi codes, codes tag) of a new custom voice's checked clip, or the 400 why it cannot be one. The
        encode runs a layer at a time, each a task of its own on the MLX thread, so the batch takes a step
        between any two of them and streams are held up for one layer's time at most, not the whole encode."""
        engine = await self._acquire()
        try:
            encode = await asyncio.wrap_future(
                self._worker.submit(lambda: engine.start_custom_voice_encode(audio), label="encode voice")
            )
            while not encode.done:
                await asyncio.wrap_future(self._worker.submit(encode.step, label="encode voice", step_after=True))
            codes = await asyncio.wrap_future(
                self._worker.submit(lambda: engine.finish_custom_voice(encode, transcript), label="encode voice")
            )
        finally:
            self._release()
        return codes, engine.codes_tag

    async def add_custom_voice(self, voice_id: str, transcript: Optional[str], codes) -> None:
        """Prefill a new custom voice now (any other replica does it when the voice is first used there)."""
        engine = await self._acquire()
        try:
            await asyncio.wrap_future(
                self._worker.submit(
                    lambda: engine.add_custom_prompt(voice_id, transcript or "", codes, "a new custom voice"),
                    label="load voice",
                )
            )
        finally:
            self._release()

    async def forget_custom_voice(self, voice_id: str) -> None:
        engine = self._life.engine
        if engine is not None:
            await asyncio.wrap_future(self._worker.submit(lambda: engine.forget_voice(voice_id), label="forget voice"))

    def worker_problem(self) -> Optional[str]:
        """Why the MLX thread cannot serve (dead, or stuck in one task past WORKER_STALL_TIMEOUT_S)."""
        live = self._worker.liveness()
        if not live.alive:
            return f"the MLX worker thread has stopped: {live.error or 'unknown reason'}"
        limit = self._settings.worker_stall_timeout_s
        if live.task not in (None, LOAD_TASK) and live.task_s > limit:
            return (
                f"the MLX worker thread has been in one {live.task!r} task for {live.task_s:.0f} s "
                f"(WORKER_STALL_TIMEOUT_S={limit:g})"
            )
        return None

    async def check_health(self) -> None:
        """Serve's replica health check: a dead or wedged MLX thread makes the replica unhealthy.

        A model that failed to load stays healthy on purpose: restarting would fail the same way, and
        /health names the reason instead."""
        problem = self.worker_problem()
        if problem:
            logger.error("model replica unhealthy: %s", problem)
            raise WorkerUnhealthy(problem)

    async def health(self) -> ReplicaHealth:
        return self.health_info()

    def health_info(self) -> ReplicaHealth:
        """This replica: where it runs, its state, batch, queue, memory and what it has served."""
        problem = self.worker_problem()
        state = self._life.state(problem)
        engine = self._life.engine
        optional = {}
        if self._settings.idle_unload_s:
            optional["idle_unload"] = {
                "after_s": self._settings.idle_unload_s,
                "unloaded": self._life.unloaded,
                "idle_s": round(self._life.idle_for(), 1),
            }
        if engine is not None:
            optional["prefix_cache"] = engine.prefixes.report()
        if state == ModelState.LOADING and self._downloads.active:
            optional["download"] = self._downloads.report()
        if error := problem or self._life.error:
            optional["error"] = error
        return ReplicaHealth(
            status=state.value,
            model=MODEL_NAME,
            model_id=self._settings.model_id,
            device=self._device_name,
            dtype=self._settings.dtype,
            quantize=self._settings.quantize or None,
            generating=self._worker.generating,
            queued=self._worker.waiting,
            max_batch_size=self._settings.max_batch_size,
            worker=self._worker.liveness().as_dict(),
            node=self._node,
            served=self._served,
            replica=self._replica_id,
            memory=self._memory_report(),
            last_load_s=None if self._load_s is None else round(self._load_s, 2),
            **optional,
        )
