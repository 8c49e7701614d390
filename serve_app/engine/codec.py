"""Per-request Mimi streaming state, and one batched Mimi call for the requests that flush together.

mlx-audio's Mimi keeps its streaming-decoder state inside its modules (the convolutions' carried-over
samples, the decoder transformer's KV cache), so one `MimiDecodeStateingDecoder` can serve one stream at a time.
With several requests in the batch each needs its own: `MimiDecodeState` holds one request's state and swaps it
into the shared modules for the duration of a decode, on the replica's one MLX thread.

`decode_states` decodes the groups of several requests in one batched call: their states are stacked
along the batch axis, decoded together, and split back. Rows batch together when they have decoded the
same number of frames and decode the same number now (so their transformer positions, masks and carried
conv shapes are the same, and each row computes exactly what it would alone); rows that differ go in
separate calls. Requests that start together (a burst) stay aligned: group sizes are the same for all.

`StagedEncode` runs a new custom voice's encode a layer at a time, so states keep going around it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_audio.lm.models.cache import KVCache

# The attributes mlx-audio's streaming conv modules carry between `step` calls.
_STATE_FIELDS = ("_prev_xs", "_left_pad_applied", "_prev_ys")


def stateful_modules(mimi) -> list:
    """The modules of Mimi's decoder path that carry streaming state (find them once per loaded Mimi)."""
    found = []
    for module in (mimi.upsample, mimi.decoder):
        for _, sub in module.named_modules():
            if hasattr(sub, "reset_state") and any(hasattr(sub, f) for f in _STATE_FIELDS):
                found.append(sub)
    return found


def contiguous_conv_weights(mimi) -> None:
    """Every Mimi convolution's weight made row-contiguous once, the same values: mlx-audio's loader leaves them
    as transposed views of the checkpoint's layout, and Metal copies such a weight on every call (conv.cpp
    `ensure_row_contiguous`): ten copies per decoded frame, ~116 MB of float32 (ops/bench/dispatch.py)."""
    from mlx_audio.codec.models.mimi.modules.conv import Conv1d, ConvTranspose1d

    made = []
    for _, module in mimi.named_modules():
        if isinstance(module, (Conv1d, ConvTranspose1d)):
            module.weight = mx.contiguous(module.weight)
            made.append(module.weight)
        if isinstance(module, ConvTranspose1d):
            module.update_in_place()  # its call's weight, from the contiguous one (a view of it, or it)
            module._expanded_weight = mx.contiguous(module._expanded_weight)
            made.append(module._expanded_weight)
    mx.eval(made)


class MimiDecoder:
    """Mimi's streaming decode as the frame loop runs it, set up once per loaded Mimi: `Mimi.decode_step`
    operation for operation, every value the same, in fewer kernels (Mimi's share of a frame is a tenth of
    its kernels; tests/engine/test_frame_math.py compares with `decode_step`):
    - the 32 codebook lookups as one gather from the codebooks stacked (each codebook is left a view of that
      table, so it costs no memory), summed in the same order, compiled (`compiled`) once per batch size: it
      depends on the codes alone, not on the stream's position;
    - the decoder transformer's attention mask made once per frame for all its layers, each of which made
      the same mask itself;
    - the convolutions' weights row-contiguous (`contiguous_conv_weights`).
    """

    def __init__(self, mimi, compiled: bool):
        self.mimi = mimi
        self.modules = stateful_modules(mimi)
        contiguous_conv_weights(mimi)
        quantizer = mimi.quantizer
        layers = [*quantizer.rvq_first.vq.layers, *quantizer.rvq_rest.vq.layers]
        self._first = len(quantizer.rvq_first.vq.layers)
        self._table = self._offsets = None
        if all(layer.project_out is None for layer in layers):
            table = mx.stack([layer.codebook._embedding for layer in layers])
            mx.eval(table)
            for i, layer in enumerate(layers):
                layer.codebook._embedding = table[i]
            self._table = table.reshape(-1, table.shape[-1])
            self._offsets = (mx.arange(len(layers), dtype=mx.int32) * table.shape[1])[None, :, None]
            mx.eval(self._table, self._offsets)
        attention = mimi.decoder_transformer.transformer.layers[0].self_attn
        self._context = attention.cfg.context
        self._codebooks = mx.compile(self._decode_codes) if compiled else self._decode_codes

    def _decode_codes(self, codes: mx.array) -> mx.array:
        """`mimi.quantizer.decode`: codes (B, K, T) -> (B, C, T)."""
        quantizer = self.mimi.quantizer
        if self._table is None:
            return quantizer.decode(codes)
        rows, books, frames = codes.shape
        found = self._table[(codes + self._offsets).flatten()].reshape(rows, books, frames, -1)

        def summed(rvq, lo: int, hi: int) -> mx.array:  # ResidualVectorQuantizer.decode on codebooks lo..hi-1
            out = found[:, lo]
            for i in range(lo + 1, hi):
                out = out + found[:, i]
            out = out.swapaxes(-1, -2)
            return rvq.output_proj(out) if rvq.output_proj is not None else out

        out = summed(quantizer.rvq_first, 0, self._first)
        return out + summed(quantizer.rvq_rest, self._first, books) if books > self._first else out

    def _mask(self, frames: int, dtype: mx.Dtype) -> mx.array:
        """The mask each layer of mlx-audio's decoder transformer makes for `frames` new positions."""
        offset = self.mimi.decoder_cache[0].offset
        pos_k = mx.arange(offset + frames, dtype=mx.int32)
        delta = (mx.arange(frames, dtype=mx.int32) + offset)[:, None] - pos_k[None, :]
        allowed = (pos_k[None, :] >= 0) & (delta >= 0)
        if self._context:
            allowed = allowed & (delta < self._context)
        return mx.where(allowed, 0.0, -1e9).astype(dtype)[None, None, :, :]

    def step(self, codes: mx.array) -> mx.array:
        """`Mimi.decode_step` on the state installed in Mimi's modules: codes (B, K, 1) -> PCM (B, 1, 1920)."""
        mimi = self.mimi
        xs = mimi.upsample.step(self._codebooks(codes))
        frames = xs.shape[-1] if mimi.decoder_transformer.conv_layout else xs.shape[1]
        xs = mimi.decoder_transformer(xs, cache=mimi.decoder_cache, mask=self._mask(frames, xs.dtype))[0]
        return mimi.decoder.step(xs)


class MimiDecodeState:
    """One request's Mimi decoder state: each decode continues exactly where its previous one stopped."""

    def __init__(self, decoder: MimiDecoder):
        self.decoder = decoder
        mimi = decoder.mimi
        self.state: Optional[list[dict]] = None  # None: nothing decoded yet
        self.cache: list[KVCache] = mimi.decoder_transformer.make_cache()
        self.frames = 0  # frames decoded so far (the decoder transformer's position)

    def decode(self, codes: np.ndarray, stream: Optional[mx.Stream] = None) -> np.ndarray:
        """codes (K, T) -> float32 PCM (T * 1920 samples)."""
        return decode_states([self], [codes], stream)[0]


def decode_states(
    states: list[MimiDecodeState], codes: list[np.ndarray], stream: Optional[mx.Stream] = None
) -> list[np.ndarray]:
    """Each request's codes (K, T) -> its float32 PCM, rows that can share a call decoded as one batch.
    Every call is launched before the first result is read; `stream`: the MLX stream to run Mimi on."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (s, c) in enumerate(zip(states, codes)):
        groups[(s.frames, c.shape[1])].append(i)
    with mx.stream(stream if stream is not None else mx.default_stream(mx.default_device())):
        launched = [
            (rows, _decode_batch([states[i] for i in rows], np.stack([codes[i] for i in rows])))
            for rows in groups.values()
        ]
    out: list[Optional[np.ndarray]] = [None] * len(states)
    for rows, pcm in launched:
        pcm = np.array(pcm)
        for j, i in enumerate(rows):
            out[i] = pcm[j]
    return out


def _decode_batch(states: list[MimiDecodeState], codes: np.ndarray) -> mx.array:
    """Aligned states' codes (B, K, T) -> PCM (B, T * 1920), launched; their states are updated."""
    pcm, state = decode_graph(states, codes)
    mx.async_eval(pcm, *state)
    return pcm


def decode_graph(states: list[MimiDecodeState], codes: np.ndarray) -> tuple[mx.array, list[mx.array]]:
    """The graph of aligned states' decode (B, K, T), nothing evaluated: PCM (B, T * 1920) and the arrays
    of their new states (which the states now hold)."""
    decoder = states[0].decoder
    mimi, modules = decoder.mimi, decoder.modules
    for i, module in enumerate(modules):
        if states[0].state is None:
            module.reset_state()
            continue
        for name in states[0].state[i]:
            values = [s.state[i][name] for s in states]
            setattr(module, name, mx.concatenate(values) if isinstance(values[0], mx.array) else values[0])
    shared_cache, mimi.decoder_cache = (
        mimi.decoder_cache,
        [_stack_cache([s.cache[n] for s in states]) for n in range(len(states[0].cache))],
    )
    try:
        tokens = mx.array(codes)
        pcm = mx.concatenate([decoder.step(tokens[:, :, t : t + 1]) for t in range(tokens.shape[-1])], axis=-1)
        pcm = pcm[:, 0].astype(mx.float32)
        batch_state = [{f: getattr(m, f) for f in _STATE_FIELDS if hasattr(m, f)} for m in modules]
        batch_cache = mimi.decoder_cache
    finally:
        mimi.decoder_cache = shared_cache
    for row, s in enumerate(states):
        s.state = [
            {f: v[row : row + 1] if isinstance(v, mx.array) else v for f, v in fields.items()} for fields in batch_state
        ]
        s.cache = [_row_cache(c, row) for c in batch_cache] if len(states) > 1 else batch_cache
        s.frames += codes.shape[-1]
    return pcm, [v for fields in batch_state for v in fields.values() if isinstance(v, mx.array)] + [
        a for c in batch_cache for a in (c.keys, c.values) if a is not None
    ]


def _stack_cache(caches: list[KVCache]) -> KVCache:
    if len(caches) == 1:
        return caches[0]
    stacked = KVCache()
    if caches[0].keys is not None:
        offset = caches[0].offset
        stacked.keys = mx.concatenate([c.keys[..., :offset, :] for c in caches])
        stacked.values = mx.concatenate([c.values[..., :offset, :] for c in caches])
        stacked.offset = offset
    return stacked


def _row_cache(cache: KVCache, row: int) -> KVCache:
    single = KVCache()
    single.keys, single.values = cache.keys[row : row + 1], cache.values[row : row + 1]
    single.offset = cache.offset
    return single


class StagedEncode:
    """`Mimi.encode(audio)` as ~20 steps, each one layer of Mimi's encoder evaluated on the whole clip.

    A new custom voice's sample is encoded on the model's only thread, which every stream shares: in one go,
    a 30 s sample held it for 97 s on this project's CPU (full-size Mimi, float32). Run a step at a time,
    with a batch step between steps (the worker takes one job, then steps the batch), states keep going.
    The steps are exactly Mimi.encode's operations in its order on the same shapes, only evaluated at layer
    boundaries (no time-chunking, which would change the codes: Mimi's streaming encode of a 5 s clip gave
    62 frames where the one-shot gave 63), so the codes are the one-shot encode's, which is how Sesame's
    reference encodes a prompt (tested byte for byte)."""

    def __init__(self, mimi, audio: np.ndarray):
        # Its own KV caches, empty as Mimi.encode makes its shared ones: another encode between two steps (a
        # voice's clip, a context segment) cannot disturb this one. The encoder's convolutions keep state only
        # for streaming (`step`), which the one-shot path does not use.
        encoder, projected = mimi.encoder, mimi.encoder_transformer
        caches = projected.make_cache()
        steps: list = [encoder.init_conv1d]
        for layer in encoder.layers:  # SeanetEncoder: each layer's residuals, then elu and its downsampling
            steps += [*layer.residuals, lambda xs, layer=layer: layer.downsample(nn.elu(xs, alpha=1.0))]
        steps.append(lambda xs: encoder.final_conv1d(nn.elu(xs, alpha=1.0)))
        steps.append(lambda xs: _into_transformer(projected, xs))  # ProjectedTransformer, layer by layer
        steps += [
            lambda xs, layer=layer, cache=cache: layer(xs, cache=cache, mask=None)
            for layer, cache in zip(projected.transformer.layers, caches)
        ]
        steps += [lambda xs: _out_of_transformer(projected, xs), mimi.downsample, mimi.quantizer.encode]
        self._steps = steps
        self._xs = mx.array(audio, dtype=mx.float32)[None, None, :]

    @property
    def done(self) -> bool:
        return not self._steps

    def step(self) -> None:
        self._xs = self._steps.pop(0)(self._xs)
        mx.eval(self._xs)

    def codes(self) -> mx.array:
        """The codes (codebooks x frames), once `done`."""
        assert self.done
        return self._xs[0]


def _into_transformer(projected, xs: mx.array) -> mx.array:
    xs = xs.swapaxes(1, 2) if projected.conv_layout else xs
    return projected.input_proj(xs) if projected.input_proj is not None else xs


def _out_of_transformer(projected, xs: mx.array) -> mx.array:
    """Output 0 of ProjectedTransformer (Mimi.encode takes `[0]`)."""
    projection = projected.output_projs[0]
    xs = projection(xs) if projection is not None else xs
    return xs.swapaxes(1, 2) if projected.conv_layout else xs
