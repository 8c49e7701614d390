"""Memory of the model replica: what /health reports, and the MLX_MEMORY_LIMIT_MB guard.

`mx.set_memory_limit` is a guideline on every backend, not a cap (MLX 0.32's own words: allocations fail
only once the limit is exceeded *and* no RAM is left, swap included). On Metal the allocator, when over the
limit, first waits for scheduled work and returns its buffer cache, then allocates anyway; on the CPU backend
the limit is a hint, and a failed allocation there can take the process down. So what enforces the limit is
ours and the same everywhere: MLX's peak is checked after every frame, a request that pushed the replica past
the limit fails with `OutOfMemoryError` (503), the generation loop releases MLX's cache, and the next request
starts clean. What no backend guarantees is that the peak never passes the limit within one frame.
"""

from __future__ import annotations

import os

import mlx.core as mx

from serve_app.core.errors import OutOfMemoryError
from serve_app.core.processes import resident_bytes

MB = 1 << 20

# How MLX and Metal word an allocation failure.
_ALLOCATION_FAILURES = (
    "unable to allocate",
    "out of memory",
    "insufficient memory",
    "maximum allowed buffer size",
    "resource limit",
)


def release_buffers() -> None:
    """Give MLX's cached buffers back to the system once nothing references them (after an idle unload):
    a collection first, so arrays held only by reference cycles go too. On the thread that owns the model."""
    import gc

    gc.collect()
    mx.clear_cache()


def memory_report() -> dict:
    """MLX's allocator figures and the resident size, in MB (peak: since the latest request began)."""
    rss = resident_bytes()
    return {
        "mlx_active_mb": round(mx.get_active_memory() / MB, 1),
        "mlx_cache_mb": round(mx.get_cache_memory() / MB, 1),
        "mlx_peak_mb": round(mx.get_peak_memory() / MB, 1),
        "rss_mb": round(rss / MB, 1) if rss else None,
        "pid": os.getpid(),
    }


class MemoryLimit:
    """Enforces MLX_MEMORY_LIMIT_MB (0: off) on the thread that does the MLX work."""

    def __init__(self, limit_mb: int):
        self.limit_mb = limit_mb

    def install(self) -> None:
        """Tell MLX the limit (a guideline for its allocator on every backend; `check` enforces it)."""
        if self.limit_mb:
            mx.set_memory_limit(self.limit_mb * MB)

    def begin_request(self) -> None:
        mx.reset_peak_memory()

    def check(self) -> None:
        """Raise `OutOfMemoryError` if MLX's peak since the request began passed the limit."""
        if self.limit_mb and mx.get_peak_memory() > self.limit_mb * MB:
            raise OutOfMemoryError(
                f"Generation needed {mx.get_peak_memory() / MB:.0f} MB of MLX memory, more than "
                f"MLX_MEMORY_LIMIT_MB={self.limit_mb}; try a shorter input."
            )

    @staticmethod
    def translate(exc: BaseException) -> BaseException:
        """MLX's allocation failures as `OutOfMemoryError`; anything else unchanged."""
        if isinstance(exc, (RuntimeError, MemoryError)) and any(s in str(exc).lower() for s in _ALLOCATION_FAILURES):
            return OutOfMemoryError(f"The model ran out of memory while generating: {exc}")
        return exc
