"""The batch's backbone cache, and a row's prompt on its own (prefill).

Continuous batching needs every request to keep its own position in the backbone's KV cache: `BatchKV`
holds the rows left-aligned, each with its own length, in capacity buckets of CAPACITY_STEP positions (the
frame function compiles once per bucket, frame.py). A joining row is prefilled alone with mlx-audio's own
backbone and cache, then added.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx_audio.lm.models.cache import make_prompt_cache

CAPACITY_STEP = 256  # the backbone cache grows in steps of this many positions


class BatchKV:
    """The backbone's keys and values for the rows of the batch: (rows, kv_heads, capacity, head_dim) per
    layer, each row left-aligned with its own length. Rows join (after their own prefill) and leave
    between steps."""

    def __init__(self, num_layers: int):
        self.keys: list[Optional[mx.array]] = [None] * num_layers
        self.values: list[Optional[mx.array]] = [None] * num_layers
        self.lengths = np.zeros(0, dtype=np.int32)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def _resize(self, capacity: int) -> None:
        for store in (self.keys, self.values):
            for i, arr in enumerate(store):
                have = arr.shape[2]
                if capacity > have:
                    store[i] = mx.pad(arr, [(0, 0), (0, 0), (0, capacity - have), (0, 0)])
                elif capacity < have:
                    store[i] = arr[:, :, :capacity, :]

    def add(self, caches: list) -> None:
        """Append a row from a prefilled single-row cache (mlx-audio `KVCache`s, one per layer)."""
        length = caches[0].offset
        capacity = max(self.capacity, bucket_for(length + 1))
        if self.rows:
            self._resize(capacity)
        for i, cache in enumerate(caches):
            k, v = (a[:, :, :length, :] for a in (cache.keys, cache.values))
            k, v = (mx.pad(a, [(0, 0), (0, 0), (0, capacity - length), (0, 0)]) for a in (k, v))
            self.keys[i] = k if self.keys[i] is None else mx.concatenate([self.keys[i], k])
            self.values[i] = v if self.values[i] is None else mx.concatenate([self.values[i], v])
        self.lengths = np.append(self.lengths, np.int32(length))

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); the cache shrinks to what the rows left still need."""
        if not rows:
            self.keys = [None] * len(self.keys)
            self.values = [None] * len(self.values)
            self.lengths = np.zeros(0, dtype=np.int32)
            return
        if rows != list(range(self.rows)):
            index = mx.array(rows)
            self.keys = [a[index] for a in self.keys]
            self.values = [a[index] for a in self.values]
            self.lengths = self.lengths[rows]
        need = bucket_for(int(self.lengths.max()) + 1)
        if need < self.capacity:
            self._resize(need)

    def row_state(self, row: int, drop_last: bool = False) -> list[tuple[mx.array, mx.array]]:
        """One row's keys and values, (1, kv_heads, length, head_dim) per layer: what it has seen so far
        (`drop_last`: all but its newest position, which a speculative step wrote)."""
        length = int(self.lengths[row]) - int(drop_last)
        return [
            (k[row : row + 1, :, :length, :], v[row : row + 1, :, :length, :]) for k, v in zip(self.keys, self.values)
        ]

    def prepare_step(self) -> None:
        """Make room for one more position in every row."""
        need = int(self.lengths.max()) + 1
        if need > self.capacity:
            self._resize(bucket_for(need))


def bucket_for(n: int) -> int:
    """The cache capacity that holds `n` positions: a whole number of CAPACITY_STEP buckets."""
    return max(CAPACITY_STEP, math.ceil(n / CAPACITY_STEP) * CAPACITY_STEP)


def prefill(model, tokens: mx.array, mask: mx.array, cache: Optional[list] = None) -> tuple[mx.array, list]:
    """A row's prompt through the backbone on its own: (1, n, K+1) -> last hidden (1, D) and its cache.
    With `cache` (a cached voice prefix, or the row's own earlier chunk) the tokens continue after it."""
    cache = cache if cache is not None else make_prompt_cache(model.backbone)
    h = (model._embed_tokens(tokens) * mx.expand_dims(mask, -1)).sum(axis=2)
    return model.backbone(h, cache=cache)[:, -1, :], cache
