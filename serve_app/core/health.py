"""What the deployments report of their health, as typed data across handles: a model replica's
(`ReplicaHealth`, also what each replica publishes for the others, model/registry.py) and the encoder's
(`EncoderHealth`). The ingress judges them into /health's answer (api/health.py).

The optional sections are left out of a report, not set to null, when they do not apply (`body()` keeps the
fields that were given): /health shows `download` only while one runs, `idle_unload` only when configured.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from serve_app.core.constants import MODEL_NAME

# A model replica's states (model/lifecycle.ModelState's values) in which it serves requests: an unloaded
# one loads again on the next request.
SERVING = frozenset({"ready", "unloading", "unloaded", "reloading"})


class ReplicaHealth(BaseModel):
    """One model replica: where it runs, its state, batch, queue, memory and what it has served."""

    model_config = ConfigDict(extra="allow")  # a newer replica's fields pass through an older ingress

    status: str  # loading, ready, failed, unhealthy, unloading, unloaded, reloading; "gone" when stale
    model: str = MODEL_NAME
    model_id: str = ""
    device: str = ""
    dtype: str = ""
    quantize: Optional[int] = None
    generating: int = 0
    queued: int = 0
    max_batch_size: int = 0
    worker: dict[str, Any] = {}
    node: dict[str, Any] = {}
    served: int = 0
    replica: str = ""
    memory: dict[str, Any] = {}
    idle_unload: Optional[dict[str, Any]] = None
    last_load_s: Optional[float] = None
    prefix_cache: Optional[dict[str, Any]] = None
    download: Optional[dict[str, Any]] = None
    error: Optional[str] = None
    # Set by the registry: when the replica published this, and how long ago that was when read.
    published: Optional[float] = None
    age_s: Optional[float] = None

    @property
    def serving(self) -> bool:
        return self.status in SERVING

    def body(self) -> dict[str, Any]:
        """As JSON: the fields that were given (an optional section that does not apply is absent)."""
        return self.model_dump(mode="json", exclude_unset=True)


class EncoderHealth(BaseModel):
    """The encoder: whether ffmpeg runs (and which one, or why not), what it is encoding, its warm spares."""

    ok: bool
    ffmpeg: str
    running: int = 0
    warm: int = 0
    warm_pids: list[int] = []
