"""The model replica's state, in one place: an enum and the transitions between its values.

    LOADING -> READY | FAILED            the first load (download, weights, prompts, warm-up)
    READY -> UNLOADING -> UNLOADED       idle for IDLE_UNLOAD_S: weights released, then MLX's memory back
    UNLOADING | UNLOADED -> RELOADING    a request came: it waits for the reload
    RELOADING -> READY | FAILED

UNHEALTHY is not stored: it is what `state` says whenever the MLX thread is dead or stuck (the worker's
liveness), whatever the load did. Requests are counted in and out under the same lock as the unload's
decision, so no unload starts under a request.
"""

from __future__ import annotations

import concurrent.futures
import enum
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

from serve_app.core.errors import ModelLoadError, ModelNotReadyError


class ModelState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"
    UNLOADED = "unloaded"
    RELOADING = "reloading"
    UNHEALTHY = "unhealthy"


class Lifecycle:
    def __init__(self):
        self._lock = threading.Lock()
        self._stored = ModelState.LOADING
        self.engine: Any = None
        self.error: Optional[str] = None
        self._reload: Optional[concurrent.futures.Future] = None
        self._in_flight = 0
        self._last_active = time.monotonic()

    def state(self, problem: Optional[str] = None) -> ModelState:
        return ModelState.UNHEALTHY if problem else self._stored

    @property
    def unloaded(self) -> bool:
        """The weights were released after an idle period (the next request reloads them)."""
        return self._stored in (ModelState.UNLOADING, ModelState.UNLOADED, ModelState.RELOADING)

    # --- load results -----------------------------------------------------------------------------------

    def loaded(self, engine) -> None:
        with self._lock:
            self.engine, self.error, self._reload = engine, None, None
            self._stored = ModelState.READY

    def failed(self, error: str) -> None:
        with self._lock:
            self.engine, self.error, self._reload = None, error, None
            self._stored = ModelState.FAILED

    def require_engine(self):
        engine = self.engine
        if engine is not None:
            return engine
        if self.error is not None:
            raise ModelLoadError(f"The model failed to load: {self.error}")
        raise ModelNotReadyError("The model is still loading; retry shortly.")

    # --- requests in and out ----------------------------------------------------------------------------

    def enter(self, start_load: Callable[[], concurrent.futures.Future]) -> Optional[concurrent.futures.Future]:
        """Count a request in; the reload it must wait for when the weights were released (started here by
        the first such request), else None."""
        with self._lock:
            self._in_flight += 1
            if self._stored in (ModelState.UNLOADING, ModelState.UNLOADED):
                self._reload = start_load()
                self._stored = ModelState.RELOADING
            return self._reload if self._stored == ModelState.RELOADING else None

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._last_active = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self._last_active if not self._in_flight else 0.0

    # --- idle unload ------------------------------------------------------------------------------------

    def begin_unload(self, idle_limit_s: float):
        """The engine to release if the replica is READY and still idle for `idle_limit_s`, else None;
        from here requests see UNLOADING (and reload)."""
        with self._lock:
            if self._stored != ModelState.READY or self.idle_for() < idle_limit_s:
                return None
            engine, self.engine = self.engine, None
            self._stored = ModelState.UNLOADING
            return engine

    def released(self) -> None:
        """MLX's memory is back after an unload."""
        with self._lock:
            if self._stored == ModelState.UNLOADING:
                self._stored = ModelState.UNLOADED
