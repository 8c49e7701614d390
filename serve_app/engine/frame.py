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
- The depth decoder restarts at position 0 every frame, so its cache is a fixed array per layer (keys and
  values together, CSM needs 33 positions) written by a select at known positions, fused with k's rotation,
  read as views of exactly the positions written, as mlx-audio's own cache reads it (`write_cache`).
- What Metal launches, not only the graph's nodes (ops/bench/dispatch.py counts both): caches written by
  selects rather than updates in place (which copy the buffer whenever the step before still reads it),
  the top-k threshold without Metal's four-kernel sort of 2,051 logits (`TopK`), the codes gathered by
  selects rather than stacked (one copy kernel per codebook), and the heads-first layout at one position
  per row as a reshape of the projection (one view where two were).
- Every row's Gumbel noise in one draw (`mx.vmap` over the rows' keys): the same bits as each row drawing
  its own, so a request's samples still do not depend on who shares its batch.

Sampling (engine/sampling.py) takes a Gumbel noise tensor per row, drawn from that request's own PRNG key:
argmax(top-k(logits) / T + g) samples the top-k softmax exactly, as Sesame's `sample_topk` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_audio.lm.models.activations import swiglu

from serve_app.engine.sampling import TopK, sample


class FrameWeights:
    """What the frame reads besides the model's own modules, made once per loaded model: RoPE tables in the
    interleaved form, each plain linear layer's weight as its transposed view (`linear`), each codebook's
    head as a view of `audio_head`, each codebook's rows of the embedding table (`embed_code`), and the
    masks the selects write by. Views of the weights, evaluated once: the graph of a frame then holds no
    transpose or slice of them (each such view is a node the host builds, or a compiled call replays, every
    frame), and the matmuls read the very arrays they read before."""

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
            start: (cos[start:end][None, None], sin[start:end][None, None]) for start, end in starts
        }  # (1, 1, S, D/2, ...): heads first, as `_attention_inputs` lays q and k out
        # Where each step of the depth decoder writes in its cache (CSM needs 33 positions), and which row of
        # the frame's codes (K, B) each codebook fills: masks made once.
        slots = mx.arange(model.args.audio_num_codebooks + 1)[None, None, None, :, None, None]
        self.decoder_slots = {start: slots == start for start in range(model.args.audio_num_codebooks + 1)}
        self.is_keys = (mx.arange(2) == 0)[:, None, None, None, None, None]  # the cache's first half: keys
        self.first_position = (mx.arange(2) == 0)[None, :, None]  # a frame's first depth step: the backbone state
        codebooks = mx.arange(model.args.audio_num_codebooks)[:, None]
        self.code_rows = [codebooks == i for i in range(model.args.audio_num_codebooks)]
        # Each codebook's rows of the embedding table, as views made once (None: quantized rows, not plain ones).
        table, vocab = model.audio_embeddings, model.args.audio_vocab_size
        self._embed_audio = model._embed_audio
        self.code_tables = (
            [table.weight[i * vocab : (i + 1) * vocab] for i in range(model.args.audio_num_codebooks)]
            if isinstance(table, nn.Embedding)
            else None
        )
        self._transposed = {
            id(module): module.weight.T
            for _, module in model.named_modules()
            if type(module) is nn.Linear and "bias" not in module
        }
        mx.eval(
            self.backbone_tables,
            self.decoder_steps,
            self.decoder_slots,
            self.is_keys,
            self.first_position,
            self.code_rows,
            self.code_tables or [],
            self.offsets,
            self.heads,
            list(self._transposed.values()),
        )

    def embed_code(self, codebook: int, tokens: mx.array) -> mx.array:
        """mlx-audio's `_embed_audio`: codebook `codebook`'s embedding of tokens (B,) -> (B, D), read from that
        codebook's rows of the table (a view made once) rather than offsetting every token (one kernel fewer)."""
        if self.code_tables is None:
            return self._embed_audio(codebook, tokens)
        return self.code_tables[codebook][tokens]

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
    """Llama3ScaledRoPE on interleaved pairs: pairs (..., D/2, 2), cos (..., D/2, 1), sin (..., D/2, 2) broadcast
    to them (positions on the axis that holds them) -> the rotated pairs (..., D/2, 2)."""
    return pairs * cos + pairs[..., ::-1] * sin


def _attention_inputs(weights, attn, y: mx.array, rows: int, length: int, cos, sin, kv_lead: tuple = ()):
    """q (B, heads, S, head_dim), k and v as pairs (*kv_lead, B, kv_heads, S, head_dim/2, 2) of rows y (B * S,
    D), q and k rotated. k and v stay pairs because the cache is written in that shape (`write_cache`): the
    select that writes it then fuses with k's rotation, one kernel for both. At one position per row (every
    step but a frame's first) the heads-first layout is the projection's own reshape: one view per array
    where moving S past the heads takes two, and the graph of a frame is mostly such views
    (`metal_graph_nodes`, ops/bench/frame_kernels.py)."""
    pair = (attn.head_dim // 2, 2)

    def heads(x: mx.array, lead: tuple = ()) -> mx.array:  # (*lead, B, heads, S, D/2, 2)
        if length == 1:
            return x.reshape(*lead, rows, -1, 1, *pair)
        moved = x.reshape(rows, length, -1, *pair).swapaxes(1, 2)
        return moved[None] if lead else moved

    q = rope(heads(weights.linear(attn.q_proj, y, rows)), cos, sin)
    k = rope(heads(weights.linear(attn.k_proj, y, rows), kv_lead), cos, sin)
    v = heads(weights.linear(attn.v_proj, y, rows), kv_lead)
    return q.reshape(*q.shape[:-2], -1), k, v


def _attention_out_and_mlp(weights, layer, x: mx.array, out: mx.array, rows: int) -> mx.array:
    """The layer's rest on x (B * S, D): attention output (B, heads, S, head_dim) projected and added, then the
    MLP (SwiGLU)."""
    out = out.reshape(x.shape[0], -1) if out.shape[2] == 1 else out.swapaxes(1, 2).reshape(x.shape[0], -1)
    x = x + weights.linear(layer.self_attn.o_proj, out, rows)
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
    slot = (mx.arange(capacity)[None, :] == positions[:, None]).reshape(rows, 1, capacity, 1, 1)  # as pairs
    cos, sin = (t[positions][:, None, None] for t in weights.backbone_tables)
    keys, values = list(keys), list(values)

    def written(cache: mx.array, new: mx.array) -> mx.array:  # a select, as `write_cache` says why
        pairs = cache.reshape(*cache.shape[:-1], *new.shape[-2:])
        return mx.where(slot, new.astype(cache.dtype), pairs).reshape(cache.shape)

    for i, layer in enumerate(backbone.layers):
        attn = layer.self_attn
        q, k, v = _attention_inputs(weights, attn, layer.input_layernorm(h), rows, 1, cos, sin)
        keys[i], values[i] = written(keys[i], k), written(values[i], v)
        out = mx.fast.scaled_dot_product_attention(q, keys[i], values[i], scale=attn.scale, mask=mask)
        h = _attention_out_and_mlp(weights, layer, h, out, rows)
    return backbone.norm(h), keys, values


def write_cache(weights, cache: Optional[mx.array], k: mx.array, v: mx.array, start: int) -> mx.array:
    """A depth-decoder layer's cache (2, B, kv_heads, 33, head_dim/2, 2): its keys then its values, with k and
    v (1, B, kv_heads, S, head_dim/2, 2) written at positions start..start+S-1 (None: the frame's first step,
    nothing written yet; what is never written is never read). One select over the whole cache, keys and
    values together, fused with k's rotation, not two updates in place: on Metal an update copies the whole
    buffer first whenever a kernel still in flight reads it (the attention of the step before does, always),
    so this is one kernel where rotation and updates are three to five, and it writes the same values (a
    select moves bits). The backbone's cache is written by a select too. Keys and values read as the two
    halves (`cache_halves`), each a contiguous block the attention reads in place at any batch."""
    for j in range(k.shape[3]):
        new = mx.where(weights.is_keys, *((x if x.shape[3] == 1 else x[:, :, :, j : j + 1]) for x in (k, v)))
        cache = mx.where(weights.decoder_slots[start + j], new, 0 if cache is None else cache)
    return cache


def cache_halves(cache: mx.array, end: int) -> tuple[mx.array, mx.array]:
    """The keys and values (B, kv_heads, end, head_dim) of a `write_cache` cache: three views."""
    rows = cache.shape[1]
    both = cache.reshape(2 * rows, *cache.shape[2:4], -1)
    return both[:rows, :, :end], both[rows:, :, :end]


def decoder_math(decoder, weights, x: mx.array, rows: int, cache: list, start: int) -> mx.array:
    """The depth decoder on rows x (B * S, D), each row's S positions start..start+S-1 (S is 2 on a frame's
    first step, 1 after), its cache one array per layer (`write_cache`): mlx-audio's LlamaModel
    with its KVCache, operation for operation -> the last position's state (B, D)."""
    length = x.shape[0] // rows
    end = start + length
    cos, sin = weights.decoder_steps[start]
    mask = "causal" if length > 1 else None  # as mlx-audio's cache makes it
    for n, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        q, k, v = _attention_inputs(weights, attn, layer.input_layernorm(x), rows, length, cos, sin, (1,))
        cache[n] = write_cache(weights, cache[n], k, v, start)
        out = mx.fast.scaled_dot_product_attention(q, *cache_halves(cache[n], end), scale=attn.scale, mask=mask)
        x = _attention_out_and_mlp(weights, layer, x, out, rows)
    x = decoder.norm(x)
    if length == 1:
        return x
    # One row's last position as a whole row (the next matmul reads a one-row operand in place only if its row
    # stride is its width: Metal's `check_transpose` copies it otherwise).
    return x[-1:] if rows == 1 else x.reshape(rows, length, -1)[:, -1, :]


def embed_frame(model, codes: mx.array, offsets: mx.array) -> mx.array:
    """The backbone input for each row's previous frame: codes (B, K) -> (B, D), text column masked.
    `offsets`: each codebook's first row in the embedding table (K,) (FrameWeights.offsets)."""
    return model.audio_embeddings(codes + offsets).sum(axis=1)


def gather_codes(weights: FrameWeights, codes: list) -> mx.array:
    """The frame's codes (B, K) as int32 from each codebook's (B,): each placed in its row of (K, B) by a select
    (a chain `mx.compile` fuses into a few kernels, where a stack is one copy kernel per codebook on Metal),
    then seen as (B, K) (one view, where a column each would take an expansion per codebook)."""
    out = 0
    for row, code in zip(weights.code_rows, codes):
        out = mx.where(row, code.astype(mx.int32), out)
    return out.T


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
    # (A select of the two, where a stack is one copy kernel per input on Metal.)
    code0 = next_input(0, weights.linear(model.codebook0_head, last))
    x = mx.where(weights.first_position, last[:, None], code0[:, None]).reshape(2 * rows, -1)
    cache: list = [None] * len(model.decoder.layers)
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
        self._fn = mx.compile(self.traced) if compiled else self._frame
        self.shapes: set[tuple[int, int]] = set()  # (rows, capacity) traced so far

    def __call__(self, prev, positions, keys, values, joined, rng, inv_temperature, kth):
        if joined or prev is None:
            return self._frame(prev, positions, keys, values, joined, rng, inv_temperature, kth)
        self.shapes.add((prev.shape[0], keys[0].shape[2]))
        return self._fn(prev, positions, keys, values, joined, rng, inv_temperature, kth)

    def traced(self, prev, positions, keys, values, joined, rng, inv_temperature, kth):
        """The steady frame as `mx.compile` traces it (before fusion): what ops/bench/dispatch.py counts."""
        return self._frame(prev, positions, keys, values, joined, rng, inv_temperature, kth, fused=self.compiled)

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

    def _frame(self, prev, positions, keys, values, joined, rng, inv_temperature, kth, fused: bool = False):
        model, args, weights = self.model, self.model.args, self.weights
        hidden = list(joined)
        if prev is not None:
            h = embed_frame(model, prev, weights.offsets)
            last, keys, values = backbone_math(model.backbone, weights, h, positions, keys, values)
            hidden.insert(0, last)
        last = mx.concatenate(hidden) if len(hidden) > 1 else hidden[0]
        noise, rng = draw_noise(rng, args.audio_num_codebooks, args.audio_vocab_size)
        # The 32 codebooks' (B, V) noise as views of one split node (rows of K * V: no squeeze per codebook).
        noise = mx.split(noise.reshape(noise.shape[0], -1), args.audio_num_codebooks, axis=1)
        top_k = TopK(kth, args.audio_vocab_size, weights.dtype, fused)
        codes: list[mx.array] = []

        def next_input(i: int, logits: mx.array) -> Optional[mx.array]:
            codes.append(sample(logits, noise[i], inv_temperature, top_k))
            return weights.embed_code(i, codes[-1]) if i + 1 < args.audio_num_codebooks else None

        depth_frame(model, weights, last, next_input)
        return gather_codes(weights, codes), rng, keys, values
