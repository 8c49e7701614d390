"""One frame of CSM for every row of the batch, as one function: the previous frame's embedding, one backbone
step, every row's noise, the 32 samples and the 31 depth-decoder steps between them.

On a GPU, CSM at batch 1 is bound by kernel launches, not arithmetic (README, Performance): each kernel costs
a few microseconds on Metal and tens of microseconds on MLX's CUDA backend, and a frame is thousands of them.
So the frame is written for few kernels, every value computed exactly as before (the same operations in the
same dtypes, so the same bits: tests/engine/test_frame_math.py runs it against the loop it replaced):

- One function, compiled (`mx.compile`) once per steady shape: the rows and the backbone cache's capacity
  bucket. Elementwise runs fuse into one kernel each across what used to be separate calls (embedding,
  backbone, depth decoder), and the host launches the whole frame with one call instead of building its
  graph op by op in Python.
- The linear layers run on 2-D rows against their weights' transposed views, made once with the heads and
  the depth decoder's RoPE rows (FrameWeights): no transpose, flatten or unflatten node per matmul for the
  host to build every frame, and the matmuls read the very arrays they read before.
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
from mlx_audio.lm.models.activations import swiglu


class FrameWeights:
    """What the frame reads besides the model's own modules, made once per loaded model: RoPE tables in the
    interleaved form, each plain linear layer's weight as its transposed view (`linear`), each codebook's
    head as a view of `audio_head`, and each codebook's first row in the embedding table. Views of the
    weights, evaluated once: the graph of a frame then holds no transpose or slice of them (each such view is
    a node the host builds, or a compiled call replays, every frame), and the matmuls read the very arrays
    they read before."""

    def __init__(self, model):
        # The dtype activations have (quantized layers too): `audio_head` is a plain array of the model's dtype.
        self.dtype = model.audio_head.dtype
        self.backbone_tables = rope_tables(model.backbone.layers[0].self_attn.rope, self.dtype)
        self.offsets = mx.arange(model.args.audio_num_codebooks, dtype=mx.int32) * model.args.audio_vocab_size
        self.heads = [model.audio_head[i] for i in range(model.audio_head.shape[0])]
        # The depth decoder's positions are the same every frame: its RoPE rows per step, as views made once.
        cos, sin = rope_tables(model.decoder.layers[0].self_attn.rope, self.dtype)
        starts = [(0, 2)] + [(start, start + 1) for start in range(2, model.args.audio_num_codebooks + 1)]
        self.decoder_steps = {
            start: (cos[start:end][None, :, None], sin[start:end][None, :, None]) for start, end in starts
        }
        self._transposed = {
            id(module): module.weight.T
            for _, module in model.named_modules()
            if type(module) is nn.Linear and "bias" not in module
        }
        mx.eval(
            self.backbone_tables,
            self.decoder_steps,
            self.offsets,
            self.heads,
            list(self._transposed.values()),
        )

    def linear(self, layer, x: mx.array, rows: Optional[int] = None) -> mx.array:
        """`layer(x)` for x (B * S, D): `x @ weight.T` as nn.Linear computes it (its matmul flattens the (B, S,
        D) it was given to (B * S, D) itself), on the weight's transposed view made once. A quantized layer
        is called as it is, on x shaped as the loop before gave it: (rows, S, D), or as it comes without
        `rows`."""
        transposed = self._transposed.get(id(layer))
        if transposed is not None:
            return x @ transposed
        if rows is None:
            return layer(x)
        return layer(x.reshape(rows, -1, x.shape[-1])).reshape(x.shape[0], -1)


def rope_tables(rope, dtype) -> tuple[mx.array, mx.array]:
    """mlx-audio's Llama3ScaledRoPE tables in `dtype` for the interleaved form: cos (P, D/2, 1) and the signed
    sin (P, D/2, 2) = [-sin, sin] per pair, for every position P. Cast from the same float32 tables, so each
    value is the one mlx-audio multiplies by."""
    cos = rope._cos_f32.astype(dtype)
    sin = rope._sin_f32.astype(dtype)
    return cos[..., None], mx.stack([-sin, sin], axis=-1)


def rope(pairs: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Llama3ScaledRoPE on interleaved pairs: pairs (B, S, H, D/2, 2), cos (B|1, S, 1, D/2, 1), sin (B|1, S, 1,
    D/2, 2) -> (B, S, H, D)."""
    rotated = pairs * cos + pairs[..., ::-1] * sin
    return rotated.reshape(*rotated.shape[:3], -1)


def _attention_inputs(weights, attn, y: mx.array, rows: int, length: int, cos, sin):
    """q, k, v (B, heads, S, head_dim) of rows y (B * S, D), q and k rotated."""
    pairs = (rows, length, -1, attn.head_dim // 2, 2)
    q = rope(weights.linear(attn.q_proj, y, rows).reshape(pairs), cos, sin).swapaxes(1, 2)
    k = rope(weights.linear(attn.k_proj, y, rows).reshape(pairs), cos, sin).swapaxes(1, 2)
    v = weights.linear(attn.v_proj, y, rows).reshape(rows, length, -1, attn.head_dim).swapaxes(1, 2)
    return q, k, v


def _attention_out_and_mlp(weights, layer, x: mx.array, out: mx.array, rows: int) -> mx.array:
    """The layer's rest on x (B * S, D): attention output projected and added, then the MLP (SwiGLU)."""
    x = x + weights.linear(layer.self_attn.o_proj, out.swapaxes(1, 2).reshape(x.shape[0], -1), rows)
    y, mlp = layer.post_attention_layernorm(x), layer.mlp
    gated = swiglu(weights.linear(mlp.gate_proj, y, rows), weights.linear(mlp.up_proj, y, rows))
    return x + weights.linear(mlp.down_proj, gated, rows)


def backbone_math(backbone, weights, h: mx.array, positions: mx.array, keys: list, values: list):
    """One new position per row through the backbone: h (B, D), positions (B,), the cache's keys and values
    per layer (B, kv_heads, capacity, head_dim) -> (the last hidden state (B, D), keys and values with each
    row's position written). mlx-audio's attention takes one offset for the whole batch; here every row has
    its own position, its own write into the cache and its own mask."""
    rows, capacity = h.shape[0], keys[0].shape[2]
    mask = (mx.arange(capacity)[None, :] <= positions[:, None]).reshape(rows, 1, 1, capacity)
    write_at = positions.reshape(rows, 1, 1, 1)
    cos, sin = (t[positions][:, None, None] for t in weights.backbone_tables)
    keys, values = list(keys), list(values)
    for i, layer in enumerate(backbone.layers):
        attn = layer.self_attn
        q, k, v = _attention_inputs(weights, attn, layer.input_layernorm(h), rows, 1, cos, sin)
        index = mx.broadcast_to(write_at, k.shape)
        keys[i] = mx.put_along_axis(keys[i], index, k.astype(keys[i].dtype), axis=2)
        values[i] = mx.put_along_axis(values[i], index, v.astype(values[i].dtype), axis=2)
        out = mx.fast.scaled_dot_product_attention(q, keys[i], values[i], scale=attn.scale, mask=mask)
        h = _attention_out_and_mlp(weights, layer, h, out, rows)
    return backbone.norm(h), keys, values


def decoder_math(decoder, weights, x: mx.array, rows: int, cache: list, start: int) -> mx.array:
    """The depth decoder on rows x (B * S, D), each row's S positions start..start+S-1 (S is 2 on a frame's
    first step, 1 after), its cache a fixed [keys, values] array pair per layer written in place: mlx-audio's
    LlamaModel with its KVCache, operation for operation -> the last position's state (B, D)."""
    length = x.shape[0] // rows
    end = start + length
    cos, sin = weights.decoder_steps[start]
    mask = "causal" if length > 1 else None  # as mlx-audio's cache makes it
    for layer, kv in zip(decoder.layers, cache):
        attn = layer.self_attn
        q, k, v = _attention_inputs(weights, attn, layer.input_layernorm(x), rows, length, cos, sin)
        kv[0][..., start:end, :] = k
        kv[1][..., start:end, :] = v
        out = mx.fast.scaled_dot_product_attention(
            q, kv[0][..., :end, :], kv[1][..., :end, :], scale=attn.scale, mask=mask
        )
        x = _attention_out_and_mlp(weights, layer, x, out, rows)
    x = decoder.norm(x)
    return x if length == 1 else x.reshape(rows, length, -1)[:, -1, :]


def embed_frame(model, codes: mx.array, offsets: mx.array) -> mx.array:
    """The backbone input for each row's previous frame: codes (B, K) -> (B, D), text column masked.
    `offsets`: each codebook's first row in the embedding table (K,) (FrameWeights.offsets)."""
    return model.audio_embeddings(codes + offsets).sum(axis=1)


def embed_code(model, codebook: int, tokens: mx.array) -> mx.array:
    """mlx-audio's `_embed_audio`: codebook `codebook`'s embedding of tokens (B,) -> (B, D), read from that
    codebook's rows of the table (a view) rather than offsetting every token (one kernel fewer)."""
    table = model.audio_embeddings
    if not isinstance(table, nn.Embedding):  # quantized: its rows are not plain rows
        return model._embed_audio(codebook, tokens)
    vocab = model.args.audio_vocab_size
    return table.weight[codebook * vocab : (codebook + 1) * vocab][tokens]


def sample(logits: mx.array, noise: mx.array, inv_temperature: mx.array, kth: mx.array) -> mx.array:
    """Top-k sampling per row with that row's Gumbel noise: argmax(top-k(logits) / T + g), as uint32 (the
    caller casts the frame's codes once); `kth` (B, 1) is vocab - top_k, the k-th largest logit's place once
    sorted. It is found in the logits' own dtype (an exact cast to float32 keeps every value and their
    order), so the cast joins the fused elementwise group instead of being a kernel of its own."""
    threshold = mx.take_along_axis(mx.sort(logits, axis=-1), kth, axis=-1).astype(mx.float32)
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


# `next_input(i, logits)`: codebook i's logits (B, V) -> the depth decoder's next input (B, D), the embedding
# of the code sampled from them (None after the last codebook).
NextInput = Callable[[int, mx.array], Optional[mx.array]]


def depth_frame(model, weights: FrameWeights, last: mx.array, next_input: NextInput) -> None:
    """The depth decoder's frame: codebook 0's logits from the backbone state `last` (B, D), then 31 steps,
    each fed the embedding of the code sampled before it. Sampling is `next_input`'s (the frame samples; the
    kernel counter substitutes inputs it made)."""
    codebooks, rows = model.args.audio_num_codebooks, last.shape[0]
    # The first step's two positions per row: the backbone state, then codebook 0's embedding.
    x = mx.stack([last, next_input(0, weights.linear(model.codebook0_head, last))], axis=1).reshape(2 * rows, -1)
    attn = model.decoder.layers[0].self_attn
    shape = (rows, attn.n_kv_heads, codebooks + 1, attn.head_dim)
    cache = [[mx.zeros(shape, last.dtype), mx.zeros(shape, last.dtype)] for _ in model.decoder.layers]
    start = 0
    for i in range(1, codebooks):
        out = decoder_math(model.decoder, weights, weights.linear(model.projection, x, rows), rows, cache, start)
        start += x.shape[0] // rows
        x = next_input(i, out @ weights.heads[i - 1])


class FrameStep:
    """The whole frame for every row, compiled when `compiled` is set.

    Call: prev (B0, K) codes of the rows that generated last frame or None, positions (B0,), the backbone's
    keys and values per layer for those rows, joined [(1, D)] last hidden states of rows joining from their
    prefill (possibly none), rng (B0 + B1, 2) keys, inv_temperature and kth (vocab - top_k) (B0 + B1, 1) ->
    (codes (B0 + B1, K), next rng, keys, values).

    Only steady frames (nobody joining) run compiled, once per shape: the rows and the backbone cache's
    capacity bucket. `mx.compile` keeps every graph it traces, ~6 MB each at full size, and a frame with rows
    joining would add one per (rows, joining, bucket) met over a server's life; such a frame, one per text
    chunk, runs uncompiled instead: the same bits (tested), some more kernels once per chunk. A steady shape
    met for the first time is traced in that call (~0.1 s for CSM-1B on this project's CPU, README
    Performance), so `prepare` does it ahead of need: at warm-up, and in the loop for the next cache bucket
    while the device runs the frame in flight."""

    def __init__(self, model, compiled: bool):
        self.model = model
        self.compiled = compiled
        self.weights = FrameWeights(model)
        self._fn = mx.compile(self._frame) if compiled else self._frame
        self.shapes: set[tuple[int, int]] = set()  # (rows, capacity) traced so far

    def __call__(self, prev, positions, keys, values, joined, rng, inv_temperature, kth):
        if joined or prev is None:
            return self._frame(prev, positions, keys, values, joined, rng, inv_temperature, kth)
        self.shapes.add((prev.shape[0], keys[0].shape[2]))
        return self._fn(prev, positions, keys, values, joined, rng, inv_temperature, kth)

    def prepare(self, rows: int, capacity: int) -> bool:
        """Trace and compile the steady frame for `rows` and the cache's `capacity` now, evaluating nothing
        (no memory is taken but the graph's), unless done already or not compiled; True if it did."""
        if not self.compiled or (rows, capacity) in self.shapes:
            return False
        self(*self.steady_arguments(rows, capacity))
        return True

    def steady_arguments(self, rows: int, capacity: int) -> tuple:
        """Arguments of a steady frame's shape (zeros, not evaluated: no memory until something evaluates
        them): `rows` generating, the backbone cache at `capacity`, nobody joining."""
        attn = self.model.backbone.layers[0].self_attn
        cache = (rows, attn.n_kv_heads, capacity, attn.head_dim)
        layers, dtype = len(self.model.backbone.layers), self.weights.dtype
        return (
            mx.zeros((rows, self.model.args.audio_num_codebooks), mx.int32),
            mx.zeros((rows,), mx.int32),
            [mx.zeros(cache, dtype) for _ in range(layers)],
            [mx.zeros(cache, dtype) for _ in range(layers)],
            [],
            mx.zeros((rows, 2), mx.uint32),
            mx.zeros((rows, 1), mx.float32),
            mx.zeros((rows, 1), mx.int32),
        )

    def _frame(self, prev, positions, keys, values, joined, rng, inv_temperature, kth):
        model, args, weights = self.model, self.model.args, self.weights
        hidden = list(joined)
        if prev is not None:
            h = embed_frame(model, prev, weights.offsets)
            last, keys, values = backbone_math(model.backbone, weights, h, positions, keys, values)
            hidden.insert(0, last)
        last = mx.concatenate(hidden) if len(hidden) > 1 else hidden[0]
        noise, rng = draw_noise(rng, args.audio_num_codebooks, args.audio_vocab_size)
        noise = mx.split(noise, args.audio_num_codebooks, axis=1)  # one node for the 32 codebooks' views
        codes: list[mx.array] = []

        def next_input(i: int, logits: mx.array) -> Optional[mx.array]:
            codes.append(sample(logits, noise[i].squeeze(1), inv_temperature, kth))
            return embed_code(model, i, codes[-1]) if i + 1 < args.audio_num_codebooks else None

        depth_frame(model, weights, last, next_input)
        return mx.stack(codes, axis=1).astype(mx.int32), rng, keys, values
