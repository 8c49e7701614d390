"""CSMModel: the MLX CSM deployment (exactly one replica).

The checkpoint loads in the background on the replica's MLX thread, so the replica starts at once and
/health can say "loading" or why loading failed instead of Serve restarting a broken replica forever.
`generate` is an async generator (a sync one keeps running after the client has gone).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import AsyncIterator, Optional

from ..errors import ModelNotReadyError
from ..logs import configure_logging
from ..observability import set_model_load
from ..protocol import Usage
from ..settings import MODEL_NAME, Settings
from ..voices import VoiceLibrary
from ..engine.generation import CSMEngine, SynthesisRequest, describe_device, select_device
from ..engine.memory import memory_report
from ..engine.scheduler import BatchScheduler
from ..engine.worker import ModelWorker

logger = logging.getLogger("sesame_tts")

GIL_SWITCH_INTERVAL_S = 0.0005


class CSMModel:
    def __init__(self, settings: Settings, voices: VoiceLibrary):
        configure_logging(settings.log_level)
        # The MLX thread runs Python between kernels and holds the GIL; a PCM group it posts reaches this
        # replica's event loop only when the GIL changes hands, after up to one switch interval (5 ms by
        # default; the first byte waited ~5 ms there). With 0.5 ms the tiny-checkpoint throughput stayed
        # within this machine's run-to-run noise (python -m serve_app.bench, three runs).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._settings = settings
        self._engine: Optional[CSMEngine] = None
        self._error: Optional[str] = None
        self._device = select_device(settings.mlx_device)
        self._worker = ModelWorker(self._device)
        self._load_started = time.monotonic()
        self._worker.submit(lambda: self._load(voices)).add_done_callback(self._loaded)

    def _load(self, voices: VoiceLibrary) -> CSMEngine:
        engine = CSMEngine.load(self._settings, voices)
        engine.warm_up()
        self._worker.scheduler = BatchScheduler(engine, self._settings.max_batch_size)
        return engine

    def _loaded(self, future) -> None:
        exc = future.exception()
        if exc is None:
            self._engine = future.result()
            logger.info("model ready after %.1f s", time.monotonic() - self._load_started)
        else:
            self._error = str(exc) if hasattr(exc, "status_code") else f"{type(exc).__name__}: {exc}"
            logger.error("model failed to load: %s", self._error, exc_info=exc)

    def _require_engine(self) -> CSMEngine:
        if self._engine is not None:
            return self._engine
        if self._error is not None:
            raise ModelNotReadyError(f"The model failed to load: {self._error}")
        raise ModelNotReadyError("The model is still loading; retry shortly.")

    async def generate(self, request: SynthesisRequest) -> AsyncIterator[bytes | Usage]:
        """Stream s16le PCM chunks for the request, then one `Usage`."""
        self._require_engine()
        set_model_load(self._worker.waiting + 1, self._worker.generating)
        try:
            async for item in self._worker.stream(request):
                set_model_load(self._worker.waiting, self._worker.generating)
                yield item
        finally:
            set_model_load(self._worker.waiting, self._worker.generating)

    async def health(self) -> dict:
        state = "ready" if self._engine else ("failed" if self._error else "loading")
        info = {"status": state, "model": MODEL_NAME, "model_id": self._settings.model_id,
                "device": describe_device(self._device), "dtype": self._settings.dtype, "quantize": self._settings.quantize or None,
                "generating": self._worker.generating, "queued": self._worker.waiting,
                "max_batch_size": self._settings.max_batch_size,
                "memory": memory_report()}
        if self._error:
            info["error"] = self._error
        return info
