"""Backbone KV reuse: a voice's fixed context is prefilled once, and requests start from its keys and values.

Every prompt of a voice with a reference clip begins with the same rows: the clip's transcript and Mimi
codes (~350 positions for Sesame's conversational_a). Prefilling them for every request and every text
chunk made the default voice start ~2x later than a voice without a clip on the tiny checkpoint and ~4x
later at full size on this CPU. Here those rows go through the backbone once, when the voice is loaded;
a request copies nothing (MLX arrays are values; a KVCache that grows reallocates) and prefills only its
own text on top.

Entries are keyed by the token rows themselves (ids and mask), so anything that adds a voice later (files
at start, voices created through an API) gets the same treatment through `add`. The cache is bounded
(VOICE_CACHE_MB, least recently used first out) and /health reports its size.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx_audio.lm.models.cache import KVCache

from serve_app.core.constants import LOGGER_NAME
from serve_app.engine.batch import prefill

logger = logging.getLogger(LOGGER_NAME)

MB = 1 << 20

State = list[tuple[mx.array, mx.array]]  # (keys, values) per backbone layer, each (1, kv_heads, n, head_dim)


def caches_from(state: State) -> list[KVCache]:
    """Fresh single-row caches holding `state` (shared, never written: the first append reallocates)."""
    caches = []
    for keys, values in state:
        cache = KVCache()
        cache.keys, cache.values, cache.offset = keys, values, keys.shape[2]
        caches.append(cache)
    return caches


def token_key(ids: np.ndarray, mask: np.ndarray) -> bytes:
    return hashlib.sha256(
        np.ascontiguousarray(ids).tobytes() + np.ascontiguousarray(mask).tobytes() + str(ids.shape).encode()
    ).digest()


class PrefixCache:
    """Prefilled backbone state of fixed token prefixes, keyed by their tokens, bounded in bytes."""

    def __init__(self, limit_mb: int):
        self.limit_bytes = limit_mb * MB
        self._entries: OrderedDict[bytes, tuple[State, int]] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def report(self) -> dict:
        return {"entries": len(self._entries), "mb": round(self.nbytes / MB, 2), "limit_mb": self.limit_bytes // MB}

    def add(self, model, ids: np.ndarray, mask: np.ndarray) -> bool:
        """Prefill these rows (n, K+1) once and keep their keys and values; False if the bound forbids it."""
        key = token_key(ids, mask)
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        _, caches = prefill(model, mx.array(ids)[None], mx.array(mask)[None])
        state = [(c.keys[..., : c.offset, :], c.values[..., : c.offset, :]) for c in caches]
        mx.eval(state)
        size = sum(k.nbytes + v.nbytes for k, v in state)
        if size > self.limit_bytes:
            logger.info(
                "prefix of %d positions (%.1f MB) is over VOICE_CACHE_MB; it is prefilled per request",
                len(ids),
                size / MB,
            )
            return False
        while self._entries and self.nbytes + size > self.limit_bytes:
            self._entries.popitem(last=False)
        self._entries[key] = (state, size)
        return True

    def remove(self, ids: np.ndarray, mask: np.ndarray) -> None:
        self._entries.pop(token_key(ids, mask), None)

    def lookup(self, key: bytes) -> Optional[list[KVCache]]:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return caches_from(entry[0])
