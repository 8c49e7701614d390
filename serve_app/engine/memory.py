"""Memory of the model replica: what /health reports, and the MLX_MEMORY_LIMIT_MB guard.

On Metal, `mx.set_memory_limit` makes MLX's allocations fail beyond the limit. MLX's CPU backend treats
the limit as a hint only (and a failed allocation there can take the process down), so the guard also
checks MLX's peak after every frame: a request that pushed the replica past the limit fails with
`OutOfMemoryError` (503), the generation loop releases MLX's cache, and the next request starts clean.
"""

from __future__ import annotations

import os
import subprocess
from typing import Optional

import mlx.core as mx

from ..errors import OutOfMemoryError

MB = 1 << 20

# How MLX and Metal word an allocation failure.
_ALLOCATION_FAILURES = ("unable to allocate", "out of memory", "insufficient memory", "maximum allowed buffer size",
                        "resource limit")


def resident_bytes() -> Optional[int]:
    """This process's resident set size now (Linux: /proc; macOS: ps)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    try:
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(os.getpid())], capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip()) * 1024
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def memory_report() -> dict:
    """MLX's allocator figures and the resident size, in MB (peak: since the latest request began)."""
    rss = resident_bytes()
    return {"mlx_active_mb": round(mx.get_active_memory() / MB, 1), "mlx_cache_mb": round(mx.get_cache_memory() / MB, 1),
            "mlx_peak_mb": round(mx.get_peak_memory() / MB, 1), "rss_mb": round(rss / MB, 1) if rss else None,
            "pid": os.getpid()}


class MemoryGuard:
    """Enforces MLX_MEMORY_LIMIT_MB (0: off) on the thread that does the MLX work."""

    def __init__(self, limit_mb: int):
        self.limit_mb = limit_mb

    def install(self) -> None:
        """Tell MLX the limit (binding on Metal, a hint on the CPU backend)."""
        if self.limit_mb:
            mx.set_memory_limit(self.limit_mb * MB)

    def begin_request(self) -> None:
        mx.reset_peak_memory()

    def check(self) -> None:
        """Raise `OutOfMemoryError` if MLX's peak since the request began passed the limit."""
        if self.limit_mb and mx.get_peak_memory() > self.limit_mb * MB:
            raise OutOfMemoryError(
                f"Generation needed {mx.get_peak_memory() / MB:.0f} MB of MLX memory, more than "
                f"MLX_MEMORY_LIMIT_MB={self.limit_mb}; try a shorter input.")

    @staticmethod
    def translate(exc: BaseException) -> BaseException:
        """MLX's allocation failures as `OutOfMemoryError`; anything else unchanged."""
        if isinstance(exc, (RuntimeError, MemoryError)) and any(s in str(exc).lower() for s in _ALLOCATION_FAILURES):
            return OutOfMemoryError(f"The model ran out of memory while generating: {exc}")
        return exc
