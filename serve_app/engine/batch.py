"""Batched CSM math: one backbone step and one frame of the depth decoder for many requests at once.

Continuous batching needs every request to keep its own position in the backbone's KV cache. mlx-audio's
attention takes one integer offset for the whole batch, so the backbone step here is our own: the same
weights and the same math (Llama-3 scaled RoPE, grouped-query attention), with a per-row position, a
per-row write into the cache and a per-row attention mask, written as a pure function of the cache so that
`mx.compile` can fuse it once per (batch size, cache capacity bucket). The depth decoder restarts at
position 0 on every frame, so all rows share its shapes: one frame of it (the 31 decoder steps and all 32
samples) is a fixed-shape function that `mx.compile` turns into one fused graph per batch size.

Sampling takes a Gumbel noise tensor per row (drawn from that request's own PRNG key), so a request's
samples do not depend on which other requests share its batch.
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
        capacity = max(self.capacity, _round_up(length + 1))
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
        need = _round_up(int(self.lengths.max()) + 1)
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
            self._resize(_round_up(need))


def _round_up(n: int) -> int:
    return max(CAPACITY_STEP, math.ceil(n / CAPACITY_STEP) * CAPACITY_STEP)


def _rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """mlx-audio's Llama3ScaledRoPE (interleaved pairs) with a position per row: x (B, S, H, D)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return mx.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape(x.shape)


def backbone_math(backbone, h: mx.array, positions: mx.array, keys: list, values: list):
    """One new position per row through the backbone, as a pure function of its inputs (so it compiles):
    h (B, 1, D), positions (B,), the cache's keys and values per layer -> (the last hidden state (B, D),
    keys, values with each row's position written)."""
    rows, capacity = h.shape[0], keys[0].shape[2]
    mask = (mx.arange(capacity)[None, :] <= positions[:, None]).reshape(rows, 1, 1, capacity)
    write_at = positions.reshape(rows, 1, 1, 1)
    rope = backbone.layers[0].self_attn.rope
    cos = rope._cos_f32[positions].astype(h.dtype).reshape(rows, 1, 1, -1)
    sin = rope._sin_f32[positions].astype(h.dtype).reshape(rows, 1, 1, -1)
    keys, values = list(keys), list(values)
    for i, layer in enumerate(backbone.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = _rope(attn.q_proj(x).reshape(rows, 1, attn.n_heads, attn.head_dim), cos, sin).swapaxes(1, 2)
        k = _rope(attn.k_proj(x).reshape(rows, 1, attn.n_kv_heads, attn.head_dim), cos, sin).swapaxes(1, 2)
        v = attn.v_proj(x).reshape(rows, 1, attn.n_kv_heads, attn.head_dim).swapaxes(1, 2)
        index = mx.broadcast_to(write_at, k.shape)
        keys[i] = mx.put_along_axis(keys[i], index, k.astype(keys[i].dtype), axis=2)
        values[i] = mx.put_along_axis(values[i], index, v.astype(values[i].dtype), axis=2)
        out = mx.fast.scaled_dot_product_attention(q, keys[i], values[i], scale=attn.scale, mask=mask)
        h = h + attn.o_proj(out.swapaxes(1, 2).reshape(rows, 1, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return backbone.norm(h)[:, -1, :], keys, values


class BackboneStep:
    """`backbone_math` on a `BatchKV`, compiled when `compiled` is set: once per (rows, cache capacity), the
    capacity growing in CAPACITY_STEP buckets, so a long generation compiles a handful of shapes."""

    def __init__(self, backbone, compiled: bool):
        self.backbone = backbone
        self._fn = mx.compile(self._run) if compiled else self._run

    def _run(self, h, positions, keys, values):
        return backbone_math(self.backbone, h, positions, keys, values)

    def __call__(self, h: mx.array, kv: BatchKV) -> mx.array:
        kv.prepare_step()
        out, kv.keys, kv.values = self._fn(h, mx.array(kv.lengths), kv.keys, kv.values)
        kv.lengths = kv.lengths + 1
        return out


def backbone_step(backbone, h: mx.array, kv: BatchKV) -> mx.array:
    """One uncompiled backbone step on a `BatchKV`: h (B, 1, D) -> the last hidden state (B, D)."""
    return BackboneStep(backbone, compiled=False)(h, kv)


def prefill(model, tokens: mx.array, mask: mx.array, cache: Optional[list] = None) -> tuple[mx.array, list]:
    """A row's prompt through the backbone on its own: (1, n, K+1) -> last hidden (1, D) and its cache.
    With `cache` (a cached voice prefix, or the row's own earlier chunk) the tokens continue after it."""
    cache = cache if cache is not None else make_prompt_cache(model.backbone)
    h = (model._embed_tokens(tokens) * mx.expand_dims(mask, -1)).sum(axis=2)
    return model.backbone(h, cache=cache)[:, -1, :], cache


def embed_frame(model, codes: mx.array) -> mx.array:
    """The backbone input for each row's previous frame: codes (B, K) -> (B, 1, D), text column masked."""
    offsets = mx.arange(codes.shape[1], dtype=mx.int32) * model.args.audio_vocab_size
    return model.audio_embeddings(codes + offsets).sum(axis=1, keepdims=True)


def sample(logits: mx.array, noise: mx.array, inv_temperature: mx.array, top_k: mx.array) -> mx.array:
    """Top-k sampling per row with that row's Gumbel noise: argmax(top-k(logits) / T + g)."""
    logits = logits.astype(mx.float32)
    vocab = logits.shape[-1]
    threshold = mx.take_along_axis(mx.sort(logits, axis=-1), vocab - top_k, axis=-1)
    logits = mx.where(logits >= threshold, logits, -mx.inf)
    return mx.argmax(logits * inv_temperature + noise, axis=-1).astype(mx.int32)


def frame_codes(model, last: mx.array, noise: mx.array, inv_temperature: mx.array, top_k: mx.array) -> mx.array:
    """All K codebooks of one frame for every row: codebook 0 from the backbone state, then the depth
    decoder's 31 steps. last (B, D), noise (B, K, V), inv_temperature (B, 1), top_k (B, 1) -> (B, K)."""
    sampled = sample(model.codebook0_head(last), noise[:, 0], inv_temperature, top_k)
    codes = [sampled]
    curr = mx.concatenate([last[:, None, :], model._embed_audio(0, sampled[:, None])], axis=1)
    cache = make_prompt_cache(model.decoder)
    for i in range(1, noise.shape[1]):
        out = model.decoder(model.projection(curr), cache=cache)
        sampled = sample(out[:, -1, :] @ model.audio_head[i - 1], noise[:, i], inv_temperature, top_k)
        codes.append(sampled)
        curr = model._embed_audio(i, sampled[:, None])
    return mx.stack(codes, axis=1)


def draw_noise(keys: list, codebooks: int, vocab: int) -> tuple[mx.array, list]:
    """Each row's Gumbel noise for one frame (B, K, V), drawn from its own PRNG key as
    `key, sub = split(key)`, and the rows' next keys."""
    pairs = [mx.random.split(key) for key in keys]
    noise = mx.stack([mx.random.gumbel(shape=(codebooks, vocab), key=pair[1]) for pair in pairs])
    return noise, [pair[0] for pair in pairs]


class FrameDecoder:
    """One frame for every row: the rows' noise from their keys, then `frame_codes`; compiled once per batch
    size (shapes are fixed within one) when `compiled` is set, the noise drawn inside the compiled graph."""

    def __init__(self, model, compiled: bool):
        self.model = model
        self.compiled = compiled
        self._fn = mx.compile(self._run) if compiled else self._run

    def _run(self, last, keys, inv_temperature, top_k):
        args = self.model.args
        noise, keys = draw_noise(keys, args.audio_num_codebooks, args.audio_vocab_size)
        return frame_codes(self.model, last, noise, inv_temperature, top_k), keys

    def __call__(self, last: mx.array, keys: list, inv_temperature: mx.array, top_k: mx.array) -> tuple[mx.array, list]:
        """last (B, D), each row's key, inv_temperature (B, 1), top_k (B, 1) -> codes (B, K), the next keys."""
        return self._fn(last, keys, inv_temperature, top_k)
