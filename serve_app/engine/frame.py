"""One frame of CSM for every row of the batch, as one function: the previous frame's embedding, one backbone
step, every row's noise, the 32 samples and the 31 depth-decoder steps between them.

On a GPU, CSM at batch 1 is bound by kernel launches, not arithmetic (README, Performance): each kernel costs
a few microseconds on Metal and tens of microseconds on MLX's CUDA backend, and a frame is thousands of them.
So the frame is written for few kernels, every value computed exactly as before (the same operations in the
same dtypes, so the same bits: tests/engine/test_frame_math.py runs it against the loop it replaced):

- One function, compiled (`mx.compile`) once per shape: the rows with a previous frame, the rows joining
  from their prefill, and the backbone cache's capacity bucket. Elementwise runs fuse into one kernel each
  across what used to be separate calls (embedding, backbone, depth decoder), and the host launches the
  whole frame with one call instead of building ~18,000 primitives in Python.
- RoPE as two products and a sum on the interleaved pairs (the rotated pair is a view), instead of four
  products, a difference, a sum and a stack: `x_even*cos - x_odd*sin` is `x_even*cos + x_odd*(-sin)` to the
  bit, as negation is exact.
- The depth decoder restarts at position 0 every frame, so its cache is a fixed array per layer written in
  place at known positions (CSM needs 33), read as views of exactly the positions written, as mlx-audio's
  own cache reads it.
- Every row's Gumbel noise in one draw (`mx.vmap` over the rows' keys): the same bits as each row drawing
  its own, so a request's samples still do not depend on who shares its batch.

Sampling takes a Gumbel noise tensor per row (drawn from that request's own PRNG key): argmax(top-k(logits) / T
+ g) samples the top-k softmax exactly, as Sesame's `sample_topk` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import mlx.core as mx
import mlx.nn as nn


def rope_tables(rope, dtype) -> tuple[mx.array, mx.array]:
    """mlx-audio's Llama3ScaledRoPE tables in `dtype` for the interleaved form: cos (P, D/2, 1) and the signed
    sin (P, D/2, 2) = [-sin, sin] per pair, for every position P. Cast from the same float32 tables, so each
    value is the one mlx-audio multiplies by."""
    cos = rope._cos_f32.astype(dtype)
    sin = rope._sin_f32.astype(dtype)
    return cos[..., None], mx.stack([-sin, sin], axis=-1)


def rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Llama3ScaledRoPE on interleaved pairs: x (B, S, H, D), cos (B|1, S, 1, D/2, 1), sin (B|1, S, 1, D/2, 2)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return (pairs * cos + pairs[..., ::-1] * sin).reshape(x.shape)


def backbone_math(backbone, tables, h: mx.array, positions: mx.array, keys: list, values: list):
    """One new position per row through the backbone: h (B, 1, D), positions (B,), the cache's keys and values
    per layer (B, kv_heads, capacity, head_dim) -> (the last hidden state (B, D), keys and values with each
    row's position written). mlx-audio's attention takes one offset for the whole batch; here every row has
    its own position, its own write into the cache and its own mask."""
    rows, capacity = h.shape[0], keys[0].shape[2]
    mask = (mx.arange(capacity)[None, :] <= positions[:, None]).reshape(rows, 1, 1, capacity)
    write_at = positions.reshape(rows, 1, 1, 1)
    cos, sin = (t[positions][:, None, None] for t in tables)
    keys, values = list(keys), list(values)
    for i, layer in enumerate(backbone.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = rope(attn.q_proj(x).reshape(rows, 1, attn.n_heads, attn.head_dim), cos, sin).swapaxes(1, 2)
        k = rope(attn.k_proj(x).reshape(rows, 1, attn.n_kv_heads, attn.head_dim), cos, sin).swapaxes(1, 2)
        v = attn.v_proj(x).reshape(rows, 1, attn.n_kv_heads, attn.head_dim).swapaxes(1, 2)
        index = mx.broadcast_to(write_at, k.shape)
        keys[i] = mx.put_along_axis(keys[i], index, k.astype(keys[i].dtype), axis=2)
        values[i] = mx.put_along_axis(values[i], index, v.astype(values[i].dtype), axis=2)
        out = mx.fast.scaled_dot_product_attention(q, keys[i], values[i], scale=attn.scale, mask=mask)
        h = h + attn.o_proj(out.swapaxes(1, 2).reshape(rows, 1, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return backbone.norm(h)[:, -1, :], keys, values


def decoder_math(decoder, tables, x: mx.array, cache: list, start: int) -> mx.array:
    """The depth decoder on x (B, S, D) at positions start..start+S-1 (S is 2 on a frame's first step, 1
    after), its cache a fixed [keys, values] array pair per layer written in place: mlx-audio's LlamaModel with
    its KVCache, operation for operation."""
    rows, length = x.shape[0], x.shape[1]
    end = start + length
    cos, sin = (t[start:end][None, :, None] for t in tables)
    mask = "causal" if length > 1 else None  # as mlx-audio's cache makes it
    for layer, kv in zip(decoder.layers, cache):
        attn = layer.self_attn
        y = layer.input_layernorm(x)
        q = rope(attn.q_proj(y).reshape(rows, length, attn.n_heads, attn.head_dim), cos, sin).swapaxes(1, 2)
        k = rope(attn.k_proj(y).reshape(rows, length, -1, attn.head_dim), cos, sin).swapaxes(1, 2)
        v = attn.v_proj(y).reshape(rows, length, -1, attn.head_dim).swapaxes(1, 2)
        kv[0][..., start:end, :] = k
        kv[1][..., start:end, :] = v
        out = mx.fast.scaled_dot_product_attention(
            q, kv[0][..., :end, :], kv[1][..., :end, :], scale=attn.scale, mask=mask
        )
        x = x + attn.o_proj(out.swapaxes(1, 2).reshape(rows, length, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return decoder.norm(x)


def embed_frame(model, codes: mx.array, offsets: Optional[mx.array] = None) -> mx.array:
    """The backbone input for each row's previous frame: codes (B, K) -> (B, 1, D), text column masked.
    `offsets`: each codebook's first row in the embedding table (K,), made once (else made here)."""
    if offsets is None:
        offsets = mx.arange(codes.shape[1], dtype=mx.int32) * model.args.audio_vocab_size
    return model.audio_embeddings(codes + offsets).sum(axis=1, keepdims=True)


def embed_code(model, codebook: int, tokens: mx.array) -> mx.array:
    """mlx-audio's `_embed_audio`: codebook `codebook`'s embedding of tokens (B, 1) -> (B, 1, D), read from
    that codebook's rows of the table (a view) rather than offsetting every token (one kernel fewer)."""
    table = model.audio_embeddings
    if not isinstance(table, nn.Embedding):  # quantized: its rows are not plain rows
        return model._embed_audio(codebook, tokens)
    vocab = model.args.audio_vocab_size
    return table.weight[codebook * vocab : (codebook + 1) * vocab][tokens]


def sample(logits: mx.array, noise: mx.array, inv_temperature: mx.array, top_k: mx.array) -> mx.array:
    """Top-k sampling per row with that row's Gumbel noise: argmax(top-k(logits) / T + g), as uint32 (the
    caller casts the frame's codes once). The k-th largest logit is found in the logits' own dtype (an
    exact cast to float32 keeps every value and their order), so the cast joins the fused elementwise
    group instead of being a kernel of its own."""
    vocab = logits.shape[-1]
    threshold = mx.take_along_axis(mx.sort(logits, axis=-1), vocab - top_k, axis=-1).astype(mx.float32)
    logits = logits.astype(mx.float32)
    logits = mx.where(logits >= threshold, logits, -mx.inf)
    return mx.argmax(logits * inv_temperature + noise, axis=-1)


def draw_noise(keys: mx.array, codebooks: int, vocab: int) -> tuple[mx.array, mx.array]:
    """Every row's Gumbel noise for one frame (B, K, V) in one draw, each from its own PRNG key (B, 2) as
    `key, sub = split(key)`, and the rows' next keys (B, 2): bit for bit what each row draws alone."""

    def one(key):
        key, sub = mx.random.split(key)
        return mx.random.gumbel(shape=(codebooks, vocab), key=sub), key

    return mx.vmap(one)(keys)


# `next_input(i, logits)`: codebook i's logits (B, V) -> the depth decoder's next input (B, 1, D), the
# embedding of the code sampled from them (None after the last codebook).
NextInput = Callable[[int, mx.array], Optional[mx.array]]


def depth_frame(model, tables, last: mx.array, next_input: NextInput) -> None:
    """The depth decoder's frame: codebook 0's logits from the backbone state `last` (B, D), then 31 steps,
    each fed the embedding of the code sampled before it. Sampling is `next_input`'s (the frame samples; the
    kernel counter substitutes inputs it made)."""
    codebooks = model.args.audio_num_codebooks
    x = mx.concatenate([last[:, None, :], next_input(0, model.codebook0_head(last))], axis=1)
    attn = model.decoder.layers[0].self_attn
    shape = (last.shape[0], attn.n_kv_heads, codebooks + 1, attn.head_dim)
    cache = [[mx.zeros(shape, last.dtype), mx.zeros(shape, last.dtype)] for _ in model.decoder.layers]
    start = 0
    for i in range(1, codebooks):
        out = decoder_math(model.decoder, tables, model.projection(x), cache, start)
        start += x.shape[1]
        x = next_input(i, out[:, -1, :] @ model.audio_head[i - 1])


class FrameStep:
    """The whole frame for every row, compiled when `compiled` is set, once per shape: rows with a previous
    frame, rows joining, the backbone cache's capacity (`mx.compile` keeps a graph per shape it meets).

    Call: prev (B0, K) codes of the rows that generated last frame or None, positions (B0,), the backbone's
    keys and values per layer for those rows, joined [(1, D)] last hidden states of rows joining from their
    prefill (possibly none), rng (B0 + B1, 2) keys, inv_temperature and top_k (B0 + B1, 1) ->
    (codes (B0 + B1, K), next rng, keys, values).

    A shape met for the first time is traced and compiled in that call (~0.1-0.2 s for CSM-1B on this
    project's CPU, README Performance), so `prepare` does it ahead of need: at warm-up for the shapes a first
    request meets, and in the loop for the next cache bucket while the device runs the frame in flight."""

    def __init__(self, model, compiled: bool):
        self.model = model
        self.compiled = compiled
        # The dtype activations have (quantized layers too): `audio_head` is a plain array of the model's dtype.
        self.dtype = model.audio_head.dtype
        self.backbone_tables = rope_tables(model.backbone.layers[0].self_attn.rope, self.dtype)
        self.decoder_tables = rope_tables(model.decoder.layers[0].self_attn.rope, self.dtype)
        self.offsets = mx.arange(model.args.audio_num_codebooks, dtype=mx.int32) * model.args.audio_vocab_size
        mx.eval(*self.backbone_tables, *self.decoder_tables, self.offsets)
        self._fn = mx.compile(self._frame) if compiled else self._frame
        self.shapes: set[tuple[int, int, int]] = set()  # (rows, joining, capacity) traced so far

    def __call__(self, prev, positions, keys, values, joined, rng, inv_temperature, top_k):
        rows = 0 if prev is None else prev.shape[0]
        self.shapes.add((rows, len(joined), keys[0].shape[2] if rows else 0))
        return self._fn(prev, positions, keys, values, joined, rng, inv_temperature, top_k)

    def prepare(self, rows: int, joining: int, capacity: int) -> bool:
        """Trace and compile the frame for `rows` generating, `joining` joining and the cache's `capacity` now,
        evaluating nothing (no memory is taken), unless done already or not compiled; True if it did."""
        capacity = capacity if rows else 0
        if not self.compiled or (rows, joining, capacity) in self.shapes:
            return False
        attn = self.model.backbone.layers[0].self_attn
        cache = (rows, attn.n_kv_heads, capacity, attn.head_dim)
        layers = len(self.model.backbone.layers)
        width = self.model.backbone.norm.weight.shape[0]
        batch = rows + joining
        self(
            mx.zeros((rows, self.model.args.audio_num_codebooks), mx.int32) if rows else None,
            mx.zeros((rows,), mx.int32) if rows else None,
            [mx.zeros(cache, self.dtype) for _ in range(layers)] if rows else None,
            [mx.zeros(cache, self.dtype) for _ in range(layers)] if rows else None,
            [mx.zeros((1, width), self.dtype) for _ in range(joining)],
            mx.zeros((batch, 2), mx.uint32),
            mx.zeros((batch, 1), mx.float32),
            mx.zeros((batch, 1), mx.int32),
        )
        return True

    def _frame(self, prev, positions, keys, values, joined, rng, inv_temperature, top_k):
        model, args = self.model, self.model.args
        hidden = list(joined)
        if prev is not None:
            h = embed_frame(model, prev, self.offsets)
            last, keys, values = backbone_math(model.backbone, self.backbone_tables, h, positions, keys, values)
            hidden.insert(0, last)
        last = mx.concatenate(hidden) if len(hidden) > 1 else hidden[0]
        noise, rng = draw_noise(rng, args.audio_num_codebooks, args.audio_vocab_size)
        codes: list[mx.array] = []

        def next_input(i: int, logits: mx.array) -> Optional[mx.array]:
            codes.append(sample(logits, noise[:, i], inv_temperature, top_k))
            return embed_code(model, i, codes[-1][:, None]) if i + 1 < args.audio_num_codebooks else None

        depth_frame(model, self.decoder_tables, last, next_input)
        return mx.stack(codes, axis=1).astype(mx.int32), rng, keys, values
